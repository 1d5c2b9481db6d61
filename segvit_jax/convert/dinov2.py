"""DINOv2 checkpoints as facebookresearch/dinov2 releases them (.pth): `register_tokens` in
the `_reg` variants, SwiGLU `mlp.w12` / `mlp.w3` in giant, blocks optionally chunked as
`blocks.{chunk}.{i}` (i is the global block index). `mask_token` is dropped.

Run-time position-embedding resize, as the release interpolates: register models bicubic with
antialias; the original models bicubic without antialias and with DINOv2's 0.1 offset on the
scale factor (`bicubic_dinov2`).
"""

from __future__ import annotations

from segvit_jax.convert import hf, timm
from segvit_jax.convert.mapping import Converted, Rule, add_cls_slot, apply_rules, \
    infer_backbone, linear, read_torch, IMAGENET_MEAN_STD

_BLOCK = r"blocks\.(?:\d+\.)?(\d+)\."
RULES = timm.EMBED_RULES + timm.block_rules(_BLOCK) + (
    Rule(r"register_tokens", "registers"),
    *hf.swiglu_in(_BLOCK + r"mlp\.w12"),
    Rule(_BLOCK + r"mlp\.w3\.weight", "encoderblock_{0}/mlp/w3/kernel", linear),
    Rule(_BLOCK + r"mlp\.w3\.bias", "encoderblock_{0}/mlp/w3/bias"),
    Rule(r"mask_token", None),
)


def load(path: str, *, num_heads: int | None = None, trust_pickle: bool = False,
         **unused) -> Converted:
  del unused
  tensors = read_torch(path, trust_pickle=trust_pickle)
  params = add_cls_slot(apply_rules(tensors, RULES, source=path, layout="DINOv2"), path)
  registers = "registers" in params
  cfg = infer_backbone(params, num_heads=num_heads, source=path, norm_eps=1e-6,
                       posemb_resize="bicubic_antialias" if registers else "bicubic_dinov2")
  return Converted(params, cfg, *IMAGENET_MEAN_STD)
