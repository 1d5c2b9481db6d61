"""segvit_jax: plain-ViT semantic segmentation (SegViT, SegFormer, EoMT) in JAX/Flax."""

from segvit_jax.bundle import Bundle, backbone_features, load_bundle, save_bundle
from segvit_jax.checkpoint import load_model

__all__ = ["Bundle", "backbone_features", "load_bundle", "load_model", "save_bundle"]
