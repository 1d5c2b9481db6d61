"""segvit_jax: plain-ViT semantic segmentation (SegViT, SegFormer, EoMT) in JAX/Flax."""

from segvit_jax.bundle import Bundle, backbone_features, load_bundle, load_model, save_bundle

__all__ = ["Bundle", "backbone_features", "load_bundle", "load_model", "save_bundle"]
