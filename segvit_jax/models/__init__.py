"""Model families. `build_model(config.model)` returns the Flax module a config names."""

from segvit_jax.models.eomt import EoMT
from segvit_jax.models.segmentor import SegFormer, SegViT, build_model, input_divisor, patch_size

__all__ = ["EoMT", "SegFormer", "SegViT", "build_model", "input_divisor", "patch_size"]
