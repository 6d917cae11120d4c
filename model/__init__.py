"""The model package: TinyTransformer and its configuration."""

from model.tiny_transformer import ModelConfig, TinyTransformer, model_config, sample_next

__all__ = ["ModelConfig", "TinyTransformer", "model_config", "sample_next"]
