"""SegViT (Zhang et al., "SegViT: Semantic Segmentation with Plain Vision Transformers",
NeurIPS 2022): a backbone tapped at a few blocks (Sec. 3.1; Table 5) and the Attention-to-Mask
(ATM) decoder (Sec. 3.2 "Decoder", Eq. (1)-(3), Fig. 2).

Backbone: the plain ViT (`vit.ViT`, AugReg weights) with the class token dropped before the
blocks and no final norm, tapped after the blocks `head.tap_layers`; or, with
`backbone.type="mit"`, SegFormer's MiT encoder (`mit.MiT`, the paper's hierarchical-backbone
variant) tapped after its stages. SegViT-Shrunk (query down-sampling and up-sampling) is a
subclass of this segmentor, in `shrunk.py`.

ATM head: one learnable token per class is refined by post-norm transformer decoder layers
against the projected features of the tapped blocks (deepest first). The cross-attention's
pre-softmax logits, averaged over heads, are each stage's mask logits; masks are summed
cumulatively across stages; a shared Dense gives K + 1 class logits (last = no object).

Output dict of `SegViT`:
  class_logits     (B, K, K + 1)  final stage
  mask_logits      (B, K, H, W)   final masks (cumulative over ATM stages), bilinearly resized
                                  to the input
  aux_outputs      list of {class_logits, mask_logits (B, K, h, w)} of the earlier stages
  semantic_scores  (B, K, H, W)   sum_q softmax(class)[c] * sigmoid(mask)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segvit_jax.models import layers, mit, vit

_dense_init = dict(kernel_init=layers.trunc_normal_02, bias_init=nn.initializers.zeros)


class DecoderLayer(nn.Module):
  """Post-norm decoder layer, as torch's TransformerDecoderLayer (ReLU FFN, dropout):
  x = LN1(x + SelfAttn(x)); x = LN2(x + CrossAttn(x, mem)); x = LN3(x + FFN(x)).

  With `return_mask`, also returns the cross-attention's head-averaged pre-softmax logits
  (B, Q, N): the ATM mask of this layer. That cross-attention, and both attentions in training
  (dropout on the attention probabilities), run the explicit softmax whatever `attention` says
  (`layers.ATTENTION_IMPLEMENTATIONS`): fused kernels return no probabilities.
  """

  num_heads: int
  mlp_dim: int
  dropout: float = 0.1
  return_mask: bool = True
  attention: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, memory: jax.Array, deterministic: bool = True):
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic)  # noqa: E731
    y = layers.Attention(self.num_heads, dropout=self.dropout, implementation=self.attention,
                         dtype=self.dtype, name="self_attn", **_dense_init)(
                             x, deterministic=deterministic)
    x = layers.layer_norm("norm1", dtype=self.dtype)(x + drop(y))
    y = layers.Attention(self.num_heads, dropout=self.dropout, return_logits=self.return_mask,
                         implementation=self.attention, dtype=self.dtype, name="cross_attn",
                         **_dense_init)(
                             x, memory, deterministic=deterministic)
    y, mask = y if self.return_mask else (y, None)
    x = layers.layer_norm("norm2", dtype=self.dtype)(x + drop(y))
    y = layers.Mlp(self.mlp_dim, activation=nn.relu, dropout=self.dropout, dtype=self.dtype,
                   name="mlp", **_dense_init)(x, deterministic)
    x = layers.layer_norm("norm3", dtype=self.dtype)(x + drop(y))
    return x, mask


def project_memory(features: jax.Array, width: int, index: int, dtype: Any) -> jax.Array:
  """The decoder's input projection of tapped features (B, N, D_s) -> (B, N, width): Dense
  `input_proj_{index}` and LayerNorm `proj_norm_{index}` (call inside a compact method)."""
  x = nn.Dense(width, dtype=dtype, name=f"input_proj_{index}",
               kernel_init=layers.logical(layers.trunc_normal_02, ("mlp", "embed")),
               bias_init=layers.logical(nn.initializers.zeros, ("embed",)))(features)
  return layers.layer_norm(f"proj_norm_{index}", dtype=dtype)(x)


class ATMHead(nn.Module):
  """Multi-stage ATM decoder.

  `features`: tapped backbone outputs (B, h_s, w_s, D_s), DEEPEST FIRST. A plain ViT gives
  one grid; a hierarchical backbone (MiT) gives finer grids for shallower stages: each
  stage's masks are then resized bilinearly to the last stage's grid before the cumulative sum
  (as the reference interpolates every stage's masks to the last one's size).
  Returns a list with one dict per stage, `class_logits` (B, K, K + 1) and the cumulative
  `mask_logits` (B, K, h, w) on the last stage's grid; the last entry is the output, the
  others are auxiliary.

  `cumulative=False` with `use_input_proj=False` and `masks_per_layer=True` is the single-stage
  variant of the Shrunk model (every layer emits masks, not summed).
  """

  num_classes: int
  width: int
  num_heads: int
  layers_per_stage: int = 3
  mlp_ratio: int = 4
  dropout: float = 0.1
  use_input_proj: bool = True
  cumulative: bool = True
  masks_per_layer: bool = False
  attention: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], *, train: bool = False) -> list[dict]:
    b = features[0].shape[0]
    out_grid = features[-1].shape[1:3]
    k = self.num_classes
    tokens = self.param("class_tokens",
                        layers.logical(nn.initializers.normal(1.0), ("queries", "embed")),
                        (k, self.width))
    x = jnp.broadcast_to(tokens.astype(self.dtype), (b, k, self.width))
    class_embed = nn.Dense(k + 1, dtype=self.dtype, name="class_embed",
                           kernel_init=layers.logical(layers.trunc_normal_02,
                                                      ("embed", "classes")),
                           bias_init=layers.logical(nn.initializers.zeros, ("classes",)))

    outputs, total = [], None
    for s, feat in enumerate(features):
      gh, gw = feat.shape[1:3]
      mem = feat.reshape(b, gh * gw, feat.shape[-1])
      if self.use_input_proj:
        mem = project_memory(mem, self.width, s, self.dtype)
      for j in range(self.layers_per_stage):
        last = j == self.layers_per_stage - 1
        emit = last or self.masks_per_layer
        x, mask = DecoderLayer(self.num_heads, self.width * self.mlp_ratio, self.dropout,
                               return_mask=emit, attention=self.attention, dtype=self.dtype,
                               name=f"decoder_{s}_layer_{j}")(x, mem, not train)
        if emit:
          mask = layers.upsample_masks(mask.reshape(b, k, gh, gw).astype(jnp.float32),
                                       out_grid)
          total = mask if (total is None or not self.cumulative) else total + mask
          outputs.append({"class_logits": class_embed(x).astype(jnp.float32),
                          "mask_logits": total})
    return outputs


BACKBONE_TYPES = ("vit", "mit")


def backbone_fields(backbone: Mapping[str, Any]) -> dict[str, Any]:
  """A config's backbone dict -> the segmentor's `backbone` field: lists as tuples, and a ViT
  without its final norm unless the config says otherwise (SegViT taps the blocks)."""
  bb = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(backbone).items()}
  if bb.get("type", "vit") == "vit":
    bb.setdefault("final_norm", False)
  return bb


def build_encoder(backbone: Mapping[str, Any], dtype: Any, **kwargs) -> nn.Module:
  """The backbone module of `backbone_fields`: `vit.ViT`, or `mit.MiT` for type "mit"."""
  bb = dict(backbone)
  kind = bb.pop("type", "vit")
  if kind == "vit":
    if bb.pop("shrink_idx", None) is not None:
      raise ValueError("backbone.shrink_idx (query down-sampling) is SegViT-Shrunk's: set "
                       "head.type='shrunk' (configs/segvit_shrunk_*.py)")
    return vit.Model(**bb, dtype=dtype, **kwargs)
  if kind == "mit":
    return mit.Model(**bb, dtype=dtype, **kwargs)
  raise ValueError(f"unknown backbone type {kind!r}; expected one of {BACKBONE_TYPES}")


class SegViT(nn.Module):
  """SegViT: `backbone` holds the backbone's fields (incl. `variant`) and its `type`
  (BACKBONE_TYPES, default "vit"; "mit": the ATM head on a SegFormer MiT encoder, the SegViT
  paper's hierarchical-backbone variant), `head` the head's fields, its `type` ("atm") and
  `tap_layers`: 0-based ViT block indices, or MiT stage indices (0..3, strides 4..32);
  `attention` the implementation of every attention, backbone and head
  (`layers.ATTENTION_IMPLEMENTATIONS`).

  Subclasses (`shrunk.SegViTShrunk`) change the backbone (`make_encoder`), the head
  (`make_head`) and the order the head reads the taps in (`head_inputs`)."""

  num_classes: int
  backbone: dict
  head: dict
  attention: str = "auto"
  dtype: Any = jnp.float32

  def setup(self):
    self.backbone_type = self.backbone.get("type", "vit")
    self.encoder = self.make_encoder()
    head = dict(self.head)
    self.tap_layers = tuple(head.pop("tap_layers"))
    head.pop("type", None)
    self.decode_head = self.make_head(head)

  def make_encoder(self) -> nn.Module:
    return build_encoder(self.backbone, self.dtype, attention=self.attention, name="backbone")

  def make_head(self, head: dict) -> nn.Module:
    return ATMHead(num_classes=self.num_classes, attention=self.attention, dtype=self.dtype,
                   name="head", **head)

  def head_inputs(self, feats: Sequence[jax.Array]) -> list[jax.Array]:
    """The tapped features in the order the head reads them: the ATM head, deepest first."""
    return [feats[i] for i in sorted(self.tap_layers, reverse=True)]

  def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, Any]:
    out, aux = self.encoder(images.astype(self.dtype), train=train)
    # A ViT is tapped after blocks, an MiT after its four stages.
    feats = aux["blocks"] if self.backbone_type == "vit" else list(out)
    what = "-block ViT" if self.backbone_type == "vit" else "-stage MiT"
    if any(not 0 <= i < len(feats) for i in self.tap_layers):
      raise ValueError(f"tap_layers {self.tap_layers} out of range for a {len(feats)}{what}")
    stages = self.decode_head(self.head_inputs(feats), train=train)
    final = stages[-1]
    masks = layers.upsample_masks(final["mask_logits"], images.shape[1:3])
    return {
        "class_logits": final["class_logits"],
        "mask_logits": masks,
        "aux_outputs": stages[:-1],
        "semantic_scores": layers.semantic_scores(final["class_logits"], masks),
    }


def from_config(model_cfg: Mapping[str, Any], dtype: Any) -> SegViT:
  """The SegViT a `config.model` (name "segvit", head.type "atm") describes."""
  head = dict(model_cfg["head"])
  if head.get("type", "atm") != "atm":
    raise ValueError(f"unknown head type {head['type']!r}; expected one of ('atm', 'shrunk')")
  return SegViT(num_classes=model_cfg["num_classes"],
                backbone=backbone_fields(model_cfg["backbone"]), head=head,
                attention=layers.attention_setting(model_cfg), dtype=dtype)


def backbone_from_config(model_cfg: Mapping[str, Any], dtype: Any) -> nn.Module:
  """The backbone of `from_config`'s model alone (its parameters: the model's "backbone")."""
  return build_encoder(backbone_fields(model_cfg["backbone"]), dtype,
                       attention=layers.attention_setting(model_cfg))


def input_divisor(model_cfg: Mapping[str, Any]) -> int:
  """What input sides must be multiples of: the patch size. An MiT takes any size; its total
  stride makes every stage grid an exact fraction of the input."""
  if model_cfg["backbone"].get("type") == "mit":
    return mit.TOTAL_STRIDE
  return vit.patch_size(model_cfg["backbone"])
