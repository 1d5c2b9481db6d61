"""The Attention-to-Mask (ATM) decoder of SegViT (Zhang et al., NeurIPS 2022, Sec. 3.1;
spec segvit.md, "ATM head").

One learnable token per class is refined by post-norm transformer decoder layers against the
projected features of tapped backbone blocks (deepest first). The cross-attention's
pre-softmax logits, averaged over heads, are each stage's mask logits; masks are summed
cumulatively across stages; a shared Dense gives K + 1 class logits (last = no object).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segvit_jax.models import layers

_dense_init = dict(kernel_init=layers.trunc_normal_02, bias_init=nn.initializers.zeros)


def _layer_norm(name: str, eps: float = 1e-5, dtype: Any = jnp.float32) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name,
                      scale_init=layers.logical(nn.initializers.ones, ("embed",)),
                      bias_init=layers.logical(nn.initializers.zeros, ("embed",)))


class DecoderLayer(nn.Module):
  """Post-norm decoder layer, as torch's TransformerDecoderLayer (ReLU FFN, dropout):
  x = LN1(x + SelfAttn(x)); x = LN2(x + CrossAttn(x, mem)); x = LN3(x + FFN(x)).

  With `return_mask`, also returns the cross-attention's head-averaged pre-softmax logits
  (B, Q, N): the ATM mask of this layer.
  """

  num_heads: int
  mlp_dim: int
  dropout: float = 0.1
  return_mask: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, memory: jax.Array, deterministic: bool = True):
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic)  # noqa: E731
    y = layers.Attention(self.num_heads, dropout=self.dropout, dtype=self.dtype,
                         name="self_attn", **_dense_init)(x, deterministic=deterministic)
    x = _layer_norm("norm1", dtype=self.dtype)(x + drop(y))
    y = layers.Attention(self.num_heads, dropout=self.dropout, return_logits=self.return_mask,
                         dtype=self.dtype, name="cross_attn", **_dense_init)(
                             x, memory, deterministic=deterministic)
    y, mask = y if self.return_mask else (y, None)
    x = _layer_norm("norm2", dtype=self.dtype)(x + drop(y))
    y = layers.Mlp(self.mlp_dim, activation=nn.relu, dropout=self.dropout, dtype=self.dtype,
                   name="mlp", **_dense_init)(x, deterministic)
    x = _layer_norm("norm3", dtype=self.dtype)(x + drop(y))
    return x, mask


def semantic_scores(class_logits: jax.Array, mask_logits: jax.Array) -> jax.Array:
  """score[b, c, y, x] = sum_q softmax(class_logits[b, q])[c] * sigmoid(mask_logits[b, q, y, x]),
  the no-object column dropped. (B, Q, K + 1), (B, Q, H, W) -> (B, K, H, W)."""
  probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[..., :-1]
  return jnp.einsum("bqc,bqhw->bchw", probs, jax.nn.sigmoid(mask_logits.astype(jnp.float32)))


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
        mem = nn.Dense(self.width, dtype=self.dtype, name=f"input_proj_{s}",
                       kernel_init=layers.logical(layers.trunc_normal_02, ("mlp", "embed")),
                       bias_init=layers.logical(nn.initializers.zeros, ("embed",)))(mem)
        mem = _layer_norm(f"proj_norm_{s}", dtype=self.dtype)(mem)
      for j in range(self.layers_per_stage):
        last = j == self.layers_per_stage - 1
        emit = last or self.masks_per_layer
        x, mask = DecoderLayer(self.num_heads, self.width * self.mlp_ratio, self.dropout,
                               return_mask=emit, dtype=self.dtype,
                               name=f"decoder_{s}_layer_{j}")(x, mem, not train)
        if emit:
          mask = layers.upsample_masks(mask.reshape(b, k, gh, gw).astype(jnp.float32),
                                       out_grid)
          total = mask if (total is None or not self.cumulative) else total + mask
          outputs.append({"class_logits": class_embed(x).astype(jnp.float32),
                          "mask_logits": total})
    return outputs


class ShrunkHead(nn.Module):
  """SegViT-Shrunk's decoder (spec segvit.md, "Shrunk structure"): query up-sampling (QU)
  followed by a single-stage ATM head.

  `features`: tapped backbone outputs (B, h, w, D), SHALLOW FIRST (not reversed): the first on
  the 1/16 grid (before the backbone's query down-sampling), the others on any grid (1/32).
  QU: one learnable query per 1/16 grid cell, stored on `query_grid` and resized to the input's
  grid with `query_resize` (like a position embedding; the reference ties the count to one
  square crop), passes `qu_layers` post-norm decoder layers whose memory is the projected
  first feature (Dense + LayerNorm), then `qu_layers` more against the next one, and so on.
  The up-sampled queries, on the 1/16 grid, are the memory of a single-stage ATM head
  (`ATMHead` without input projection) whose every layer emits class logits and its own,
  not summed, masks. Returns `ATMHead`'s list (the last entry is the output).
  """

  num_classes: int
  width: int
  num_heads: int
  query_grid: tuple[int, int]
  qu_layers: int = 3
  atm_layers: int = 3
  mlp_ratio: int = 4
  dropout: float = 0.1
  query_resize: str = "bicubic"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], *, train: bool = False) -> list[dict]:
    b, gh, gw, _ = features[0].shape
    qh, qw = self.query_grid
    queries = self.param("queries",
                         layers.logical(nn.initializers.normal(1.0), ("queries", "embed")),
                         (qh * qw, self.width))
    queries = layers.resize_posemb(queries.reshape(1, qh, qw, self.width), (gh, gw),
                                   self.query_resize)
    x = jnp.broadcast_to(queries.reshape(1, gh * gw, self.width).astype(self.dtype),
                         (b, gh * gw, self.width))
    for s, feat in enumerate(features):
      mem = feat.reshape(b, -1, feat.shape[-1])
      mem = nn.Dense(self.width, dtype=self.dtype, name=f"input_proj_{s}",
                     kernel_init=layers.logical(layers.trunc_normal_02, ("mlp", "embed")),
                     bias_init=layers.logical(nn.initializers.zeros, ("embed",)))(mem)
      mem = _layer_norm(f"proj_norm_{s}", dtype=self.dtype)(mem)
      for j in range(self.qu_layers):
        x, _ = DecoderLayer(self.num_heads, self.width * self.mlp_ratio, self.dropout,
                            return_mask=False, dtype=self.dtype,
                            name=f"decoder_{s}_layer_{j}")(x, mem, not train)
    return ATMHead(self.num_classes, self.width, self.num_heads, self.atm_layers,
                   self.mlp_ratio, self.dropout, use_input_proj=False, cumulative=False,
                   masks_per_layer=True, dtype=self.dtype, name="atm")(
                       [x.reshape(b, gh, gw, self.width)], train=train)
