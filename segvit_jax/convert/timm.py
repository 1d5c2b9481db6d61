"""timm ViT checkpoints (.safetensors or .pth): AugReg copies hosted as timm models and
timm's DINOv2 (LayerScale `ls1/ls2.gamma`, `reg_token`, SwiGLU packed into `mlp.fc1`).

The timm ViT layout is written here once (`embed_rules`, `block_rules`) and reused by the
DINOv2 release (`dinov2.py`) and EoMT's release (`eomt.py`), which keep timm's names.

timm folds the cls position into `cls_token` for register models (`no_embed_class`): their
`pos_embed` has no cls slot; `backbone.add_cls_slot` tells the two apart by its length.
Run-time position-embedding resize: bicubic with antialias, as timm's
`resample_abs_pos_embed` does.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from segvit_jax.convert.backbone import AUGREG_MEAN_STD, IMAGENET_MEAN_STD, Converted, \
    add_cls_slot, infer_backbone
from segvit_jax.convert.rules import QKV, KeyRule, Transform, conv, identity, linear, mlp, \
    norm, packed_linear, read_torch, swiglu, to_ours


def embed_rules(theirs: str = "", ours: str = "", *, posemb_in: Transform = identity,
                posemb_out: Transform = identity) -> tuple[KeyRule, ...]:
  """cls_token, pos_embed (through `posemb_in` / `posemb_out`), patch_embed.proj and the
  final norm under key prefix `theirs` <-> our ViT under `ours`."""
  return (KeyRule(theirs + "cls_token", ours + "cls"),
          KeyRule(theirs + "pos_embed", ours + "pos_embedding", posemb_in, posemb_out),
          *conv(theirs + "patch_embed.proj", ours + "embedding"),
          *norm(theirs + "norm", ours + "encoder_norm"))


def block_rules(theirs: str, ours: str, ffn: str = "mlp") -> tuple[KeyRule, ...]:
  """One timm ViT block (`theirs`, e.g. "blocks.{i}.") <-> our encoder block (`ours`, e.g.
  "encoderblock_{i}/"): norm1, attn.qkv (q, k, v packed), attn.proj, ls1.gamma, norm2, the
  FFN (`ffn` "mlp": mlp.fc1 / fc2; "swiglu": timm's SwiGLUPacked, fc1 = [gate; value] and
  fc2), ls2.gamma."""
  ffn_rules = (mlp if ffn == "mlp" else swiglu)(theirs + "mlp.", ours + "mlp", ("fc1", "fc2"))
  return (*norm(theirs + "norm1", ours + "norm1"),
          *packed_linear(theirs + "attn.qkv", [f"{ours}attn/{n}" for n in QKV]),
          *linear(theirs + "attn.proj", ours + "attn/out"),
          KeyRule(theirs + "ls1.gamma", ours + "ls1"),
          *norm(theirs + "norm2", ours + "norm2"),
          *ffn_rules,
          KeyRule(theirs + "ls2.gamma", ours + "ls2"))


def ffn_of(tensors: Mapping[str, np.ndarray], mlp_key: str) -> str:
  """"swiglu" when the FFN under `mlp_key` (e.g. "blocks.0.mlp.") is timm's packed SwiGLU:
  fc1 (2h, D) with fc2 (D, h); a plain MLP has fc1 (h, D). Else "mlp"."""
  fc1, fc2 = tensors.get(mlp_key + "fc1.weight"), tensors.get(mlp_key + "fc2.weight")
  if fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]:
    return "swiglu"
  return "mlp"


RULES = {ffn: (*embed_rules(), KeyRule("reg_token", "registers"),
               *block_rules("blocks.{i}.", "encoderblock_{i}/", ffn)) for ffn in ("mlp", "swiglu")}
DROPPED = (r"(head|fc_norm)\..*",)  # the classifier


def load(path: str, *, num_heads: int | None = None, trust_pickle: bool = False,
         **unused) -> Converted:
  del unused
  tensors = read_torch(path, trust_pickle=trust_pickle)
  params = to_ours(tensors, RULES[ffn_of(tensors, "blocks.0.mlp.")], source=path,
                   layout="timm", dropped=DROPPED, model="ViT")
  params = add_cls_slot(params, path)
  cfg = infer_backbone(params, num_heads=num_heads, source=path, norm_eps=1e-6,
                       posemb_resize="bicubic_antialias")
  # LayerScale marks the DINOv2 family (ImageNet statistics); AugReg copies use 0.5 / 0.5.
  mean_std = IMAGENET_MEAN_STD if cfg["layerscale"] is not None else AUGREG_MEAN_STD
  return Converted(params, cfg, *mean_std)
