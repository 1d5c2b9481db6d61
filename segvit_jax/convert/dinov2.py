"""DINOv2 checkpoints as facebookresearch/dinov2 releases them (.pth): timm's ViT layout
(`timm.py`) with `register_tokens` in the `_reg` variants, SwiGLU `mlp.w12` / `mlp.w3` in
giant, blocks optionally chunked as `blocks.{chunk}.{i}` (i is the global block index).
`mask_token` is dropped.

Run-time position-embedding resize, as the release interpolates: register models bicubic with
antialias; the original models bicubic without antialias and with DINOv2's 0.1 offset on the
scale factor (`bicubic_dinov2`).
"""

from __future__ import annotations

from segvit_jax.convert import timm
from segvit_jax.convert.backbone import IMAGENET_MEAN_STD, Converted, add_cls_slot, \
    infer_backbone
from segvit_jax.convert.rules import KeyRule, read_torch, swiglu, to_ours

# Blocks as `blocks.{i}` or, in releases saved with block_chunks, `blocks.{chunk}.{i}`.
_BLOCKS = ("blocks.{i}.", "blocks.{chunk}.{i}.")
RULES = (
    *timm.embed_rules(),
    KeyRule("register_tokens", "registers"),
    *(r for b in _BLOCKS for r in (*timm.block_rules(b, "encoderblock_{i}/"),
                                   *swiglu(b + "mlp.", "encoderblock_{i}/mlp", ("w12", "w3")))),
)
DROPPED = ("mask_token",)


def load(path: str, *, num_heads: int | None = None, trust_pickle: bool = False,
         **unused) -> Converted:
  del unused
  tensors = read_torch(path, trust_pickle=trust_pickle)
  params = add_cls_slot(to_ours(tensors, RULES, source=path, layout="DINOv2", dropped=DROPPED,
                                model="ViT"), path)
  registers = "registers" in params
  cfg = infer_backbone(params, num_heads=num_heads, source=path, norm_eps=1e-6,
                       posemb_resize="bicubic_antialias" if registers else "bicubic_dinov2")
  return Converted(params, cfg, *IMAGENET_MEAN_STD)
