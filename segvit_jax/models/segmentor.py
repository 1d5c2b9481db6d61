"""Segmentors: a backbone joined to a decode head, returning everything training, inference
and analysis need.

SegViT (spec segvit.md): plain ViT with the class token dropped before the blocks + ATM head
(`head.type="atm"`; on a SegFormer MiT encoder with `backbone.type="mit"`), or SegViT-Shrunk:
the ViT with query down-sampling (`backbone.shrink_idx`) + query up-sampling and a
single-stage ATM head (`head.type="shrunk"`, `atm.ShrunkHead`).
Output dict:
  class_logits     (B, K, K + 1)  final stage (Shrunk: final layer)
  mask_logits      (B, K, H, W)   final masks (cumulative over ATM stages), bilinearly resized
                                  to the input
  aux_outputs      list of {class_logits, mask_logits (B, K, h, w)} of the earlier stages
                   (Shrunk: of the earlier ATM layers)
  semantic_scores  (B, K, H, W)   sum_q softmax(class)[c] * sigmoid(mask)

SegFormer (spec segformer.md): MiT encoder (`mit.Model`) + all-MLP decoder
(`segformer_head.SegFormerHead`). Output dict:
  logits           (B, K, H/4, W/4)  per-pixel class logits on the stage-1 grid (train on these,
                                     resized to the labels, as mmseg does)
  semantic_scores  (B, K, H, W)      the logits bilinearly resized to the input
Variables: {"params", "batch_stats"} (the decoder's BatchNorm); `train=True` needs
`mutable=["batch_stats"]`.

EoMT (spec eomt.md): `eomt.EoMT`, a DINOv2 ViT whose last `num_blocks` blocks also carry
`num_queries` learnable queries, with masked attention in training (`mask_probs` call
argument). Output dict: class_logits (B, K, C + 1), mask_logits (B, K, H/4, W/4), aux_outputs
(intermediate predictions, training only), semantic_scores (B, C, H, W); see eomt.py.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from segvit_jax.models import atm, eomt, layers, mit, segformer_head, vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


HEAD_TYPES = ("atm", "shrunk")


BACKBONE_TYPES = ("vit", "mit")


class SegViT(nn.Module):
  """SegViT: `backbone` holds the backbone's fields (incl. `variant`) and its `type`
  (BACKBONE_TYPES, default "vit"; "mit": the ATM head on a SegFormer MiT encoder, the SegViT
  paper's hierarchical-backbone variant), `head` the head's fields, its `type` (HEAD_TYPES,
  default "atm") and `tap_layers`: 0-based ViT block indices, or MiT stage indices (0..3,
  strides 4..32)."""

  num_classes: int
  backbone: dict
  head: dict
  dtype: Any = jnp.float32

  def setup(self):
    backbone = dict(self.backbone)
    self.backbone_type = backbone.pop("type", "vit")
    if self.backbone_type == "vit":
      self.encoder = vit.Model(**backbone, dtype=self.dtype, name="backbone")
    elif self.backbone_type == "mit":
      self.encoder = mit.Model(**backbone, dtype=self.dtype, name="backbone")
    else:
      raise ValueError(f"unknown backbone type {self.backbone_type!r}; expected one of "
                       f"{BACKBONE_TYPES}")
    head = dict(self.head)
    self.tap_layers = tuple(head.pop("tap_layers"))
    self.head_type = head.pop("type", "atm")
    if self.head_type == "atm":
      self.decode_head = atm.ATMHead(num_classes=self.num_classes, dtype=self.dtype,
                                     name="head", **head)
    elif self.head_type == "shrunk":
      head["query_grid"] = tuple(head["query_grid"])
      self.decode_head = atm.ShrunkHead(num_classes=self.num_classes, dtype=self.dtype,
                                        name="head", **head)
    else:
      raise ValueError(f"unknown head type {self.head_type!r}; expected one of {HEAD_TYPES}")

  def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, Any]:
    out, aux = self.encoder(images.astype(self.dtype), train=train)
    # A ViT is tapped after blocks, an MiT after its four stages.
    feats = aux["blocks"] if self.backbone_type == "vit" else list(out)
    what = "-block ViT" if self.backbone_type == "vit" else "-stage MiT"
    if any(not 0 <= i < len(feats) for i in self.tap_layers):
      raise ValueError(f"tap_layers {self.tap_layers} out of range for a {len(feats)}{what}")
    # The ATM head reads the deepest block first, the Shrunk head the shallowest.
    order = sorted(self.tap_layers, reverse=self.head_type == "atm")
    taps = [feats[i] for i in order]
    stages = self.decode_head(taps, train=train)
    final = stages[-1]
    masks = layers.upsample_masks(final["mask_logits"], images.shape[1:3])
    return {
        "class_logits": final["class_logits"],
        "mask_logits": masks,
        "aux_outputs": stages[:-1],
        "semantic_scores": atm.semantic_scores(final["class_logits"], masks),
    }


class SegFormer(nn.Module):
  """SegFormer: `backbone` holds MiT fields (incl. `variant`), `head` SegFormerHead's fields
  (`width`, `dropout`)."""

  num_classes: int
  backbone: dict
  head: dict
  dtype: Any = jnp.float32

  def setup(self):
    self.encoder = mit.Model(**self.backbone, dtype=self.dtype, name="backbone")
    self.decode_head = segformer_head.SegFormerHead(num_classes=self.num_classes,
                                                    dtype=self.dtype, name="head", **self.head)

  def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, Any]:
    features, _ = self.encoder(images.astype(self.dtype), train=train)
    logits = self.decode_head(features, train=train).astype(jnp.float32)
    return {"logits": logits,
            "semantic_scores": layers.upsample_masks(logits, images.shape[1:3])}


def patch_size(model_cfg: ml_collections.ConfigDict | dict) -> int:
  """The backbone patch size a model config implies (its variant, or an explicit override)."""
  bb = model_cfg["backbone"]
  return int(bb.get("patch_size") or vit.decode_variant(bb["variant"])["patch_size"])


def input_divisor(model_cfg: ml_collections.ConfigDict | dict) -> int:
  """What input sides must be multiples of: the patch size, twice that with query
  down-sampling (the token grid is halved inside the backbone). A SegFormer takes any size;
  its 32 (the MiT's total stride) makes every stage grid an exact fraction of the input."""
  if model_cfg.get("name") == "segformer" or model_cfg["backbone"].get("type") == "mit":
    return 32
  shrunk = model_cfg["backbone"].get("shrink_idx") is not None
  return patch_size(model_cfg) * (2 if shrunk else 1)


def build_model(model_cfg: ml_collections.ConfigDict | dict) -> nn.Module:
  """Builds the module a `config.model` describes (`name` selects the family)."""
  cfg = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
  name = cfg.pop("name", "segvit")
  dtype = DTYPES[cfg.pop("dtype", "float32")]
  if name == "vit":  # a backbone alone (converted pretrained weights)
    backbone = dict(cfg["backbone"])
    backbone["posemb_grid"] = tuple(backbone["posemb_grid"])
    return vit.Model(**backbone, dtype=dtype)
  if name == "segvit":
    backbone = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg["backbone"].items()}
    if backbone.get("type", "vit") == "vit":
      backbone.setdefault("final_norm", False)
    return SegViT(num_classes=cfg["num_classes"], backbone=backbone, head=dict(cfg["head"]),
                  dtype=dtype)
  if name == "segformer":
    backbone = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg["backbone"].items()}
    return SegFormer(num_classes=cfg["num_classes"], backbone=backbone, head=dict(cfg["head"]),
                     dtype=dtype)
  if name == "eomt":
    return eomt.EoMT(num_classes=cfg["num_classes"], num_queries=cfg["num_queries"],
                     num_blocks=cfg["num_blocks"], backbone=dict(cfg["backbone"]), dtype=dtype)
  raise ValueError(f"unknown model name {name!r}; known: 'eomt', 'segformer', 'segvit', 'vit'")
