"""SegViT (Zhang et al., NeurIPS 2022) and SegViT-Shrunk as plain `torch.nn.Module`s, no mmcv or
mmseg: the plain ViT tapped at a few blocks and the Attention-to-Mask (ATM) head (Sec. 3.1, 3.2
"Decoder", Eq. (1)-(3)), and the Shrunk form with query down-sampling (QD) in the ViT and
query up-sampling (QU) before a single-stage ATM head (Sec. 3.2 "The Shrunk structure.").

The forward pass is that of our Flax models (`segvit_jax.models.segvit`, `.shrunk`), in eval
mode (no dropout, no drop path); the module structure, and so every `state_dict()` key, is that
of the authors' release (zbwxp/SegVit, mmseg 0.24: mmseg's VisionTransformer / vit_shrink,
`ATMHead`, `TPNATMHead`), without the release's loss buffers:

  backbone.{cls_token, pos_embed, patch_embed.projection, layers.{i}.{ln1, attn.attn, ln2,
    ffn.layers.0.0, ffn.layers.1}}
  ATM head: decode_head.{q, class_embed, input_proj_{s+1}, proj_norm_{s+1},
    decoder_{s+1}.layers.{j}.{self_attn, multihead_attn.{q, k, v, proj}, linear1, linear2,
    norm1, norm2, norm3}}
  Shrunk head: decode_head.{q (the QU queries), input_proj_{s+1}, proj_norm_{s+1},
    decoder_{s+1}.layers.{j} (cross-attention packed: multihead_attn.in_proj_*), atm.{q,
    class_embed, decoder_1.layers.{j}}}

Images are (B, 3, H, W), normalised with the model's pixel statistics; H and W multiples of
the patch size (of twice it with QD). Outputs, as the Flax model's: `class_logits`
(B, K, K + 1), `mask_logits` (B, K, H, W), `aux_outputs` (the earlier stages' / layers'
class and mask logits on the token grid), `semantic_scores` (B, K, H, W).
`segvit_jax.torch` builds these modules from a model config and loads bundles and release
files into them.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F  # noqa: N812 (torch's name)
from torch import nn

# `segvit_jax.models.layers.RESIZE_METHODS` as F.interpolate calls: (mode, antialias, scale
# factor offset o: scale_factor = (out + o) / in, DINOv2's kludge).
RESIZE_METHODS = {
    "bicubic": ("bicubic", False, None),
    "bicubic_antialias": ("bicubic", True, None),
    "bicubic_dinov2": ("bicubic", False, 0.1),
    "bilinear": ("bilinear", False, None),
}


def resize_grid(x: torch.Tensor, size: Sequence[int], method: str) -> torch.Tensor:
  """(B, C, h, w) -> (B, C, *size) by a named method (RESIZE_METHODS, align_corners=False);
  `x` itself when the size is unchanged (as `layers.resize_grid`)."""
  if tuple(x.shape[-2:]) == tuple(size):
    return x
  mode, antialias, offset = RESIZE_METHODS[method]
  if offset is None:
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False,
                         antialias=antialias)
  factors = tuple((n + offset) / m for n, m in zip(size, x.shape[-2:]))
  return F.interpolate(x, scale_factor=factors, mode=mode, align_corners=False,
                       antialias=antialias)


def semantic_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
  """score[b, c] = sum_q softmax(class_logits[b, q])[c] * sigmoid(mask_logits[b, q]), the
  no-object column dropped: (B, Q, K + 1), (B, Q, H, W) -> (B, K, H, W)."""
  probs = class_logits.float().softmax(dim=-1)[..., :-1]
  return torch.einsum("bqc,bqhw->bchw", probs, mask_logits.float().sigmoid())


# ----------------------------------------------------------------------------------------------
# The ViT (mmseg's VisionTransformer, with vit_shrink's query down-sampling)


class PatchEmbed(nn.Module):
  def __init__(self, width: int, patch_size: int, in_chans: int = 3):
    super().__init__()
    self.projection = nn.Conv2d(in_chans, width, patch_size, stride=patch_size)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.projection(x)


class Attention(nn.Module):
  """mmcv's MultiheadAttention: a torch nn.MultiheadAttention (q, k, v packed) under `attn`."""

  def __init__(self, width: int, num_heads: int):
    super().__init__()
    self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)

  def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    return self.attn(x, kv, kv, need_weights=False)[0]


class FFN(nn.Module):
  """mmcv's FFN: `layers.0.0` (fc1, exact GELU), `layers.1` (fc2)."""

  def __init__(self, width: int, mlp_dim: int):
    super().__init__()
    self.layers = nn.Sequential(nn.Sequential(nn.Linear(width, mlp_dim), nn.GELU()),
                                nn.Linear(mlp_dim, width))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.layers(x)


class EncoderBlock(nn.Module):
  """Pre-norm block, x + MHA(LN1(x)), then x + FFN(LN2(x)). With `kv` (QD), the queries and
  the residual are `x`, keys and values LN1(kv): the output has the length of `x`."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, norm_eps: float):
    super().__init__()
    self.ln1 = nn.LayerNorm(width, eps=norm_eps)
    self.attn = Attention(width, num_heads)
    self.ln2 = nn.LayerNorm(width, eps=norm_eps)
    self.ffn = FFN(width, mlp_dim)

  def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
    q = self.ln1(x)
    x = x + self.attn(q, q if kv is None else self.ln1(kv))
    return x + self.ffn(self.ln2(x))


class ViT(nn.Module):
  """The plain ViT as SegViT runs it: the class token (and its position slot) exist; the
  blocks see it only with `cls_in_blocks`; no final norm; the position embedding, stored on
  `posemb_grid`, resized to the input's grid with `posemb_resize`. `shrink_idx`: the block of
  query down-sampling (the prefix tokens and the top-left token of every 2x2 window query all
  tokens; later blocks run on the halved grid), None for none. Returns every block's patch
  tokens (B, h, w, D)."""

  def __init__(self, width: int, depth: int, mlp_dim: int, num_heads: int, patch_size: int,
               posemb_grid: Sequence[int], posemb_resize: str = "bicubic",
               cls_in_blocks: bool = False, norm_eps: float = 1e-6,
               shrink_idx: int | None = None):
    super().__init__()
    if posemb_resize not in RESIZE_METHODS:
      raise ValueError(f"backbone.posemb_resize={posemb_resize!r}: expected one of "
                       f"{tuple(RESIZE_METHODS)}")
    if shrink_idx is not None and not 0 <= shrink_idx < depth:
      raise ValueError(f"backbone.shrink_idx={shrink_idx} out of range for a {depth}-block ViT")
    self.patch_size, self.posemb_grid = patch_size, tuple(posemb_grid)
    self.posemb_resize, self.cls_in_blocks, self.shrink_idx = posemb_resize, cls_in_blocks, \
        shrink_idx
    self.patch_embed = PatchEmbed(width, patch_size)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.posemb_grid[0] * self.posemb_grid[1],
                                              width))
    self.layers = nn.ModuleList(EncoderBlock(width, num_heads, mlp_dim, norm_eps)
                                for _ in range(depth))

  def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
    b, _, h, w = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"input {h}x{w} is not divisible by the patch size {p}")
    x = self.patch_embed(images)  # (B, D, gh, gw)
    d, gh, gw = x.shape[1:]
    pos = self.pos_embed[:, 1:].reshape(1, *self.posemb_grid, d).permute(0, 3, 1, 2)
    pos = resize_grid(pos, (gh, gw), self.posemb_resize)
    x = (x + pos).flatten(2).transpose(1, 2)
    n_prefix = int(self.cls_in_blocks)
    if n_prefix:
      x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1), x], dim=1)
    blocks = []
    for i, layer in enumerate(self.layers):
      if i == self.shrink_idx:
        if gh % 2 or gw % 2:
          raise ValueError(f"query down-sampling needs an even token grid, got {gh}x{gw}: "
                           f"input sides must be multiples of {2 * p}")
        down = x[:, n_prefix:].reshape(b, gh, gw, d)[:, ::2, ::2]
        gh, gw = gh // 2, gw // 2
        x = layer(torch.cat([x[:, :n_prefix], down.reshape(b, gh * gw, d)], dim=1), kv=x)
      else:
        x = layer(x)
      blocks.append(x[:, n_prefix:].reshape(b, gh, gw, d))
    return blocks


# ----------------------------------------------------------------------------------------------
# The decoders


class CrossAttention(nn.Module):
  """The ATM cross-attention (q, k, v, proj Linear layers): (output, the head-averaged
  pre-softmax logits (B, Q, N), the layer's mask logits)."""

  def __init__(self, width: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
    self.proj = nn.Linear(width, width)

  def forward(self, x: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, nq, d = x.shape
    h = self.num_heads
    split = lambda t: t.reshape(b, t.shape[1], h, d // h).transpose(1, 2)  # noqa: E731
    q, k, v = split(self.q(x)), split(self.k(mem)), split(self.v(mem))
    logits = (q @ k.transpose(-2, -1)) * (d // h) ** -0.5  # (B, heads, Q, N)
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, nq, d)
    return self.proj(out), logits.mean(dim=1)


class DecoderLayer(nn.Module):
  """Post-norm decoder layer (torch's TransformerDecoderLayer, ReLU FFN):
  x = norm1(x + SelfAttn(x)); x = norm2(x + CrossAttn(x, mem)); x = norm3(x + FFN(x)).
  `masks`: the ATM layer (cross-attention `CrossAttention`, returns its mask logits); else
  the QU layer (a packed nn.MultiheadAttention, returns None)."""

  def __init__(self, width: int, num_heads: int, ffn_dim: int, masks: bool):
    super().__init__()
    self.self_attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
    self.multihead_attn = (CrossAttention(width, num_heads) if masks
                           else nn.MultiheadAttention(width, num_heads, batch_first=True))
    self.linear1 = nn.Linear(width, ffn_dim)
    self.linear2 = nn.Linear(ffn_dim, width)
    self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(width) for _ in range(3))

  def forward(self, x: torch.Tensor, mem: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = self.norm1(x + self.self_attn(x, x, x, need_weights=False)[0])
    if isinstance(self.multihead_attn, CrossAttention):
      y, mask = self.multihead_attn(x, mem)
    else:
      y, mask = self.multihead_attn(x, mem, mem, need_weights=False)[0], None
    x = self.norm2(x + y)
    return self.norm3(x + self.linear2(F.relu(self.linear1(x)))), mask


class Decoder(nn.Module):
  """`layers.{j}`: decoder layers run in turn; returns each layer's (tokens, mask)."""

  def __init__(self, width: int, num_heads: int, ffn_dim: int, num_layers: int, masks: bool):
    super().__init__()
    self.layers = nn.ModuleList(DecoderLayer(width, num_heads, ffn_dim, masks)
                                for _ in range(num_layers))

  def forward(self, x: torch.Tensor, mem: torch.Tensor) -> list[tuple[torch.Tensor, Any]]:
    outs = []
    for layer in self.layers:
      x, mask = layer(x, mem)
      outs.append((x, mask))
    return outs


def _add_projection(module: nn.Module, s: int, in_dim: int, width: int) -> None:
  module.add_module(f"input_proj_{s + 1}", nn.Linear(in_dim, width))
  module.add_module(f"proj_norm_{s + 1}", nn.LayerNorm(width))


def _project(module: nn.Module, s: int, feat: torch.Tensor) -> torch.Tensor:
  """Tapped features (B, h, w, D) -> the decoder memory (B, h * w, width) of stage s."""
  x = getattr(module, f"input_proj_{s + 1}")(feat.flatten(1, 2))
  return getattr(module, f"proj_norm_{s + 1}")(x)


class ATMHead(nn.Module):
  """The ATM decoder: one token per class (`q`) refined by `layers_per_stage` decoder layers
  against each stage's features (deepest first), projected (`input_proj_{s+1}`,
  `proj_norm_{s+1}`) unless `input_proj` is off; each stage's last layer's cross-attention
  logits are its masks, summed over stages (`cumulative`); a shared `class_embed` gives K + 1
  class logits. `masks_per_layer` with one stage, no projection and `cumulative` off: the
  Shrunk model's single-stage head, every layer an output. Returns one dict per output
  (class_logits, mask_logits (B, K, h, w)); the last is the model's."""

  def __init__(self, num_classes: int, in_dim: int, width: int, num_heads: int,
               num_stages: int, layers_per_stage: int, mlp_ratio: int, *,
               input_proj: bool = True, cumulative: bool = True, masks_per_layer: bool = False):
    super().__init__()
    self.num_stages, self.input_proj = num_stages, input_proj
    self.cumulative, self.masks_per_layer = cumulative, masks_per_layer
    for s in range(num_stages):
      if input_proj:
        _add_projection(self, s, in_dim, width)
      self.add_module(f"decoder_{s + 1}", Decoder(width, num_heads, width * mlp_ratio,
                                                  layers_per_stage, masks=True))
    self.q = nn.Embedding(num_classes, width)
    self.class_embed = nn.Linear(width, num_classes + 1)

  def forward(self, features: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    b = features[0].shape[0]
    x = self.q.weight.unsqueeze(0).expand(b, -1, -1)
    outputs, total = [], None
    for s, feat in enumerate(features):
      gh, gw = feat.shape[1:3]
      mem = _project(self, s, feat) if self.input_proj else feat.flatten(1, 2)
      layers = getattr(self, f"decoder_{s + 1}")(x, mem)
      x = layers[-1][0]
      for x_j, mask in layers if self.masks_per_layer else layers[-1:]:
        mask = mask.reshape(b, -1, gh, gw)
        total = mask if total is None or not self.cumulative else total + mask
        outputs.append({"class_logits": self.class_embed(x_j), "mask_logits": total})
    return outputs


class ShrunkHead(nn.Module):
  """SegViT-Shrunk's decoder (the release's TPNATMHead): QU, one learnable query per cell of
  the 1/16 grid (`q`, stored on `query_grid`, resized to the input's grid with
  `query_resize`), refined by `qu_layers` decoder layers against each tapped feature (shallow
  first, projected), then the single-stage ATM head under `atm`, its memory the refined
  queries."""

  def __init__(self, num_classes: int, in_dim: int, width: int, num_heads: int,
               num_stages: int, query_grid: Sequence[int], qu_layers: int, atm_layers: int,
               mlp_ratio: int, query_resize: str = "bicubic"):
    super().__init__()
    if query_resize not in RESIZE_METHODS:
      raise ValueError(f"head.query_resize={query_resize!r}: expected one of "
                       f"{tuple(RESIZE_METHODS)}")
    self.query_grid, self.query_resize, self.num_stages = tuple(query_grid), query_resize, \
        num_stages
    for s in range(num_stages):
      _add_projection(self, s, in_dim, width)
      self.add_module(f"decoder_{s + 1}", Decoder(width, num_heads, width * mlp_ratio,
                                                  qu_layers, masks=False))
    self.q = nn.Embedding(self.query_grid[0] * self.query_grid[1], width)
    self.atm = ATMHead(num_classes, width, width, num_heads, 1, atm_layers, mlp_ratio,
                       input_proj=False, cumulative=False, masks_per_layer=True)

  def forward(self, features: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    b, gh, gw, _ = features[0].shape
    q = self.q.weight.reshape(1, *self.query_grid, -1).permute(0, 3, 1, 2)
    q = resize_grid(q, (gh, gw), self.query_resize).flatten(2).transpose(1, 2)
    x = q.expand(b, -1, -1)
    for s, feat in enumerate(features):
      x = getattr(self, f"decoder_{s + 1}")(x, _project(self, s, feat))[-1][0]
    return self.atm([x.reshape(b, gh, gw, -1)])


# ----------------------------------------------------------------------------------------------
# The segmentors


class SegViT(nn.Module):
  """The ViT (`backbone`) tapped after the blocks `tap_layers` (0-based) and the ATM head
  (`decode_head`) reading them deepest first. `backbone`: `ViT`'s arguments; `head`:
  `ATMHead`'s (width, num_heads, layers_per_stage, mlp_ratio). `config`: the model config
  it was built from (`segvit_jax.torch.from_config`), or None."""

  def __init__(self, num_classes: int, backbone: Mapping[str, Any], head: Mapping[str, Any],
               tap_layers: Sequence[int], config: Mapping[str, Any] | None = None):
    super().__init__()
    depth = backbone["depth"]
    if not tap_layers or any(not 0 <= i < depth for i in tap_layers):
      raise ValueError(f"head.tap_layers={tuple(tap_layers)} out of range for a {depth}-block "
                       "ViT")
    self.num_classes, self.tap_layers, self.config = num_classes, tuple(tap_layers), config
    # What `segvit_jax.torch.load` gives a loaded model: the pixel statistics (0-255) the
    # weights expect and the class names.
    self.mean: tuple[float, ...] | None = None
    self.std: tuple[float, ...] | None = None
    self.class_names: tuple[str, ...] = ()
    self.backbone = ViT(**backbone)
    self.decode_head = self.make_head(num_classes, backbone["width"], dict(head))

  def make_head(self, num_classes: int, in_dim: int, head: dict) -> nn.Module:
    return ATMHead(num_classes, in_dim, num_stages=len(self.tap_layers), **head)

  def head_inputs(self, blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tapped blocks in the order the head reads them (ATM: deepest first)."""
    return [blocks[i] for i in sorted(self.tap_layers, reverse=True)]

  def forward(self, images: torch.Tensor) -> dict[str, Any]:
    outputs = self.decode_head(self.head_inputs(self.backbone(images)))
    final = outputs[-1]
    masks = resize_grid(final["mask_logits"], images.shape[-2:], "bilinear")
    return {"class_logits": final["class_logits"], "mask_logits": masks,
            "aux_outputs": outputs[:-1],
            "semantic_scores": semantic_scores(final["class_logits"], masks)}


class SegViTShrunk(SegViT):
  """SegViT-Shrunk: the ViT with query down-sampling (`backbone["shrink_idx"]`) and the QU
  head (`ShrunkHead`'s arguments: width, num_heads, query_grid, qu_layers, atm_layers,
  mlp_ratio, query_resize) reading the tapped blocks shallow first."""

  def make_head(self, num_classes: int, in_dim: int, head: dict) -> nn.Module:
    return ShrunkHead(num_classes, in_dim, num_stages=len(self.tap_layers), **head)

  def head_inputs(self, blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [blocks[i] for i in sorted(self.tap_layers)]
