"""SegViT-Shrunk (Zhang et al., NeurIPS 2022, Sec. 3.2 "The Shrunk structure.", Fig. 3 (c);
ablations Tables 7 and 8): SegViT with query down-sampling (QD) inside the ViT, which halves
the token grid for the deeper blocks, and query up-sampling (QU) in the decoder, which then
ends in a single-stage ATM head.

  QD    `ShrunkViT`, a `vit.ViT` with the same parameters: block `shrink_idx` takes as queries
        the prefix tokens and the top-left token of every 2x2 window of the patch grid
        (`query_downsample`) and all tokens as keys and values, x = down + MHA(LN1(down),
        LN1(full)), then the FFN; every later block runs on the halved grid, so input sides
        must be multiples of 2 x the patch size.
  QU    `ShrunkHead`: learnable queries on the 1/16 grid refined against the tapped blocks
        (read shallow first), then a single-stage `segvit.ATMHead` whose every layer emits
        class logits and masks.
  Model `SegViTShrunk`, the `segvit.SegViT` segmentor with these two parts; a config's
        model.name "segvit" with head.type "shrunk" (`backbone.shrink_idx`, `head.tap_layers`,
        `head.query_grid`, ...). Its output dict is SegViT's: class_logits / mask_logits of the
        final ATM layer, the earlier ATM layers in aux_outputs, semantic_scores.

Parameters: `backbone/...` as the ViT's (`encoderblock_{i}`, ...); `head/queries`,
`head/input_proj_{s}`, `head/proj_norm_{s}`, `head/decoder_{s}_layer_{j}` (QU) and
`head/atm/...` (the single-stage ATM head).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segvit_jax.models import layers, segvit, vit


def query_downsample(x: jax.Array, n_prefix: int, grid: tuple[int, int],
                     patch_size: int) -> tuple[jax.Array, tuple[int, int]]:
  """SegViT-Shrunk's QD queries: tokens (B, n_prefix + gh * gw, D) -> the prefix tokens (cls,
  registers) and the top-left patch token of every 2x2 window (nearest 2x down-sampling of
  the grid), (B, n_prefix + gh * gw / 4, D), and the halved grid."""
  gh, gw = grid
  if gh % 2 or gw % 2:
    raise ValueError(f"query down-sampling needs an even token grid, got {gh}x{gw}: input "
                     f"sides must be multiples of {2 * patch_size}")
  b, _, d = x.shape
  down = x[:, n_prefix:].reshape(b, gh, gw, d)[:, ::2, ::2].reshape(b, -1, d)
  return jnp.concatenate([x[:, :n_prefix], down], axis=1), (gh // 2, gw // 2)


class ShrunkViT(vit.ViT):
  """`vit.ViT` with query down-sampling (QD): block `shrink_idx` takes as queries the top-left
  token of every 2x2 window of the patch grid (keys / values: all tokens) and every later
  block runs on the halved grid (`query_downsample`); None: the plain ViT. The blocks before
  and after it run on different grids, so QD needs them unrolled (no `scan_layers`)."""

  shrink_idx: int | None = None

  def run_blocks(self, x: jax.Array, grid: tuple[int, int], n_prefix: int, train: bool
                 ) -> tuple[jax.Array, list[jax.Array], tuple[int, int]]:
    if self.shrink_idx is not None:
      if not 0 <= self.shrink_idx < self.depth:
        raise ValueError(f"shrink_idx={self.shrink_idx} out of range for a {self.depth}-block "
                         "ViT")
      if self.scan_layers:
        raise ValueError("scan_layers does not support query down-sampling (shrink_idx): the "
                         "blocks before and after it run on different grids; use remat")
    return super().run_blocks(x, grid, n_prefix, train)

  def run_block(self, i: int, block: nn.Module, x: jax.Array, grid: tuple[int, int],
                n_prefix: int, deterministic: bool, drop_path: float, rng: jax.Array | None
                ) -> tuple[jax.Array, tuple[int, int]]:
    if i != self.shrink_idx:
      return super().run_block(i, block, x, grid, n_prefix, deterministic, drop_path, rng)
    # The QD block: the down-sampled tokens attend to all of them, residual on the former.
    down, grid = query_downsample(x, n_prefix, grid, self.patch_size)
    return block(down, deterministic, drop_path, rng, x), grid


def Model(variant: str | None = None, **kwargs) -> ShrunkViT:  # noqa: N802 (as vit.Model)
  """`Model(variant="B/16", shrink_idx=6)`; explicit keyword sizes override the variant's."""
  sizes = vit.decode_variant(variant) if variant else {}
  return ShrunkViT(**{**sizes, **kwargs})


class ShrunkHead(nn.Module):
  """SegViT-Shrunk's decoder (SegViT Sec. 3.2, "The Shrunk structure."): query up-sampling (QU)
  followed by a single-stage ATM head.

  `features`: tapped backbone outputs (B, h, w, D), SHALLOW FIRST (not reversed): the first on
  the 1/16 grid (before the backbone's query down-sampling), the others on any grid (1/32).
  QU: one learnable query per 1/16 grid cell, stored on `query_grid` and resized to the input's
  grid with `query_resize` (like a position embedding; the reference ties the count to one
  square crop), passes `qu_layers` post-norm decoder layers whose memory is the projected
  first feature (Dense + LayerNorm), then `qu_layers` more against the next one, and so on.
  The up-sampled queries, on the 1/16 grid, are the memory of a single-stage ATM head
  (`segvit.ATMHead` without input projection) whose every layer emits class logits and its own,
  not summed, masks. Returns `segvit.ATMHead`'s list (the last entry is the output).
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
  attention: str = "auto"
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
      mem = segvit.project_memory(feat.reshape(b, -1, feat.shape[-1]), self.width, s,
                                  self.dtype)
      for j in range(self.qu_layers):
        x, _ = segvit.DecoderLayer(self.num_heads, self.width * self.mlp_ratio, self.dropout,
                                   return_mask=False, attention=self.attention,
                                   dtype=self.dtype,
                                   name=f"decoder_{s}_layer_{j}")(x, mem, not train)
    return segvit.ATMHead(self.num_classes, self.width, self.num_heads, self.atm_layers,
                          self.mlp_ratio, self.dropout, use_input_proj=False,
                          cumulative=False, masks_per_layer=True, attention=self.attention,
                          dtype=self.dtype, name="atm")([x.reshape(b, gh, gw, self.width)],
                                                        train=train)


def build_encoder(backbone: Mapping[str, Any], dtype: Any, **kwargs) -> ShrunkViT:
  """The `ShrunkViT` of a `segvit.backbone_fields` dict."""
  bb = dict(backbone)
  if bb.pop("type", "vit") != "vit":
    raise ValueError("SegViT-Shrunk down-samples the queries of a plain ViT: set "
                     "backbone.type='vit'")
  return Model(**bb, dtype=dtype, **kwargs)


class SegViTShrunk(segvit.SegViT):
  """The SegViT segmentor with a `ShrunkViT` backbone and a `ShrunkHead` reading the tapped
  blocks shallow first (the first before query down-sampling, on the 1/16 grid)."""

  def make_encoder(self) -> nn.Module:
    return build_encoder(self.backbone, self.dtype, attention=self.attention, name="backbone")

  def make_head(self, head: dict) -> nn.Module:
    head["query_grid"] = tuple(head["query_grid"])
    return ShrunkHead(num_classes=self.num_classes, attention=self.attention, dtype=self.dtype,
                      name="head", **head)

  def head_inputs(self, feats: Sequence[jax.Array]) -> list[jax.Array]:
    return [feats[i] for i in sorted(self.tap_layers)]


def from_config(model_cfg: Mapping[str, Any], dtype: Any) -> SegViTShrunk:
  """The SegViT-Shrunk a `config.model` (name "segvit", head.type "shrunk") describes."""
  return SegViTShrunk(num_classes=model_cfg["num_classes"],
                      backbone=segvit.backbone_fields(model_cfg["backbone"]),
                      head=dict(model_cfg["head"]),
                      attention=layers.attention_setting(model_cfg), dtype=dtype)


def backbone_from_config(model_cfg: Mapping[str, Any], dtype: Any) -> ShrunkViT:
  """The backbone of `from_config`'s model alone (its parameters: the model's "backbone")."""
  return build_encoder(segvit.backbone_fields(model_cfg["backbone"]), dtype,
                       attention=layers.attention_setting(model_cfg))


def input_divisor(model_cfg: Mapping[str, Any]) -> int:
  """What input sides must be multiples of: twice the patch size with query down-sampling
  (the token grid is halved inside the backbone), else the patch size."""
  bb = model_cfg["backbone"]
  return vit.patch_size(bb) * (2 if bb.get("shrink_idx") is not None else 1)
