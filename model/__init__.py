"""The model package: TinyTransformer and its configuration."""

from model.tiny_transformer import ModelConfig, TinyTransformer, sample_next

__all__ = ["ModelConfig", "TinyTransformer", "sample_next"]
