"""AugReg / big_vision ViT checkpoints (.npz), every flavour in spec checkpoints.md:
pre-linen numbering (`LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3`),
per-type numbering (`..._0, ..._0, LayerNorm_1, MlpBlock_0`), `params/` or `params/img/`
nesting, top-level `pos_embedding` without a cls slot, and blocks stacked on a leading depth
axis (`Transformer/encoderblock/...`, nn.scan). Classifier heads are dropped.

Run-time position-embedding resize: torch bicubic (align_corners=False, no antialias), the
method SegViT's mmseg loader uses. (The big_vision / vision_transformer loaders zoom
bilinearly with scipy; choose `bilinear` for something close, or any of
`layers.RESIZE_METHODS`.)
"""

from __future__ import annotations

import re

import numpy as np

from segvit_jax.convert.mapping import Converted, Rule, apply_rules, add_cls_slot, \
    infer_backbone, merge_heads_in, merge_heads_out, read_npz, strip_prefix, AUGREG_MEAN_STD

_BLOCK = r"Transformer/encoderblock_(\d+)/"
RULES = (
    Rule(r"embedding/(kernel|bias)", "embedding/{0}"),
    Rule(r"cls", "cls"),
    Rule(r"(?:Transformer/posembed_input/)?pos_embedding", "pos_embedding"),
    Rule(_BLOCK + r"LayerNorm_0/(scale|bias)", "encoderblock_{0}/norm1/{1}"),
    Rule(_BLOCK + r"LayerNorm_[12]/(scale|bias)", "encoderblock_{0}/norm2/{1}"),
    Rule(_BLOCK + r"MultiHeadDotProductAttention_[01]/(query|key|value)/(kernel|bias)",
         "encoderblock_{0}/attn/{1}/{2}", merge_heads_in),
    Rule(_BLOCK + r"MultiHeadDotProductAttention_[01]/out/kernel",
         "encoderblock_{0}/attn/out/kernel", merge_heads_out),
    Rule(_BLOCK + r"MultiHeadDotProductAttention_[01]/out/bias", "encoderblock_{0}/attn/out/bias"),
    Rule(_BLOCK + r"MlpBlock_[03]/Dense_0/(kernel|bias)", "encoderblock_{0}/mlp/fc1/{1}"),
    Rule(_BLOCK + r"MlpBlock_[03]/Dense_1/(kernel|bias)", "encoderblock_{0}/mlp/fc2/{1}"),
    Rule(r"Transformer/encoder_norm/(scale|bias)", "encoder_norm/{0}"),
    Rule(r"(head|pre_logits|MAPHead_\d+|opt)/.*", None),  # classifier / optimizer state
)


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
  params = add_cls_slot(apply_rules(tensors, RULES, source=path, layout="AugReg .npz"), path)
  cfg = infer_backbone(params, num_heads=num_heads, source=path, norm_eps=1e-6,
                       posemb_resize="bicubic")
  return Converted(params, cfg, *AUGREG_MEAN_STD)
