"""The model package: the reference TinyTransformer and its configuration (tiny_transformer.py), and the
kernels training swaps into it on a CPU (fast_cpu.py: use_fast_cpu_path)."""

from model.tiny_transformer import ModelConfig, TinyTransformer, model_config, sample_next

__all__ = ["ModelConfig", "TinyTransformer", "model_config", "sample_next"]
