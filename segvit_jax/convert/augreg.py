"""AugReg / big_vision ViT checkpoints (.npz), every flavour the public files come in:
pre-linen numbering (`LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3`),
per-type numbering (`..._0, ..._0, LayerNorm_1, MlpBlock_0`), `params/` or `params/img/`
nesting, top-level `pos_embedding` without a cls slot, and blocks stacked on a leading depth
axis (`Transformer/encoderblock/...`, nn.scan). Classifier heads are dropped. The table only
reads: DenseGeneral kernels are merged over their heads.

Run-time position-embedding resize: torch bicubic (align_corners=False, no antialias), the
method SegViT's mmseg loader uses. (The big_vision / vision_transformer loaders zoom
bilinearly with scipy; choose `bilinear` for something close, or any of
`layers.RESIZE_METHODS`.)
"""

from __future__ import annotations

import re

import numpy as np

from segvit_jax.convert.backbone import AUGREG_MEAN_STD, Converted, add_cls_slot, \
    infer_backbone
from segvit_jax.convert.rules import KeyRule, merge_heads_in, merge_heads_out, read_npz, \
    strip_prefix, to_ours

_B, _O = "Transformer/encoderblock_{i}/", "encoderblock_{i}/"
_NORM, _DENSE = "{p:scale|bias}", "{p:kernel|bias}"  # a Flax module's parameters
# Either numbering: pre-linen (one counter across module types) or per type.
_ATTN = _B + "MultiHeadDotProductAttention_{n:0|1}/"
RULES = (
    KeyRule("embedding/" + _DENSE, "embedding/" + _DENSE),
    KeyRule("cls", "cls"),
    KeyRule("pos_embedding", "pos_embedding"),
    KeyRule("Transformer/posembed_input/pos_embedding", "pos_embedding"),
    KeyRule(_B + "LayerNorm_0/" + _NORM, _O + "norm1/" + _NORM),
    KeyRule(_B + "LayerNorm_{n:1|2}/" + _NORM, _O + "norm2/" + _NORM),
    KeyRule(_ATTN + "{x:query|key|value}/" + _DENSE, _O + "attn/{x:query|key|value}/" + _DENSE,
            merge_heads_in, None),
    KeyRule(_ATTN + "out/kernel", _O + "attn/out/kernel", merge_heads_out, None),
    KeyRule(_ATTN + "out/bias", _O + "attn/out/bias"),
    KeyRule(_B + "MlpBlock_{n:0|3}/Dense_0/" + _DENSE, _O + "mlp/fc1/" + _DENSE),
    KeyRule(_B + "MlpBlock_{n:0|3}/Dense_1/" + _DENSE, _O + "mlp/fc2/" + _DENSE),
    KeyRule("Transformer/encoder_norm/" + _NORM, "encoder_norm/" + _NORM),
)
DROPPED = (r"(head|pre_logits|MAPHead_\d+|opt)/.*",)  # classifier / optimizer state


def unstack_blocks(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`Transformer/encoderblock/X` (depth, ...) -> `Transformer/encoderblock_{i}/X`."""
  out = {}
  for k, v in tensors.items():
    m = re.fullmatch(r"Transformer/encoderblock/(.*)", k)
    if m:
      out.update({f"Transformer/encoderblock_{i}/{m[1]}": v[i] for i in range(v.shape[0])})
    else:
      out[k] = v
  return out


def load(path: str, *, num_heads: int | None = None, **unused) -> Converted:
  del unused
  tensors = unstack_blocks(strip_prefix(read_npz(path), ("params/img/", "params/", "img/")))
  if num_heads is None:  # DenseGeneral kernels record it: (D, heads, head_dim)
    q = [v for k, v in tensors.items() if re.search(r"Attention_\d/query/kernel$", k)]
    num_heads = q[0].shape[1] if q else None
  params = add_cls_slot(to_ours(tensors, RULES, source=path, layout="AugReg .npz",
                                dropped=DROPPED, model="ViT"), path)
  cfg = infer_backbone(params, num_heads=num_heads, source=path, norm_eps=1e-6,
                       posemb_resize="bicubic")
  return Converted(params, cfg, *AUGREG_MEAN_STD)
