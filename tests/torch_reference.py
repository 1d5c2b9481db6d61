"""A small, independent PyTorch reference of SegViT, written from the spec (segvit.md), for the
parity tests. Nothing here is imported by the library.

- `ViT`: plain pre-norm ViT (LN eps 1e-6, exact GELU, qkv bias, optional cls token in the
  blocks, position embedding resized with F.interpolate bicubic, align_corners=False).
- `ATMHead`: the Attention-to-Mask decoder (post-norm decoder layers, nn.MultiheadAttention for
  self-attention, a hand-written cross-attention that also returns the head-averaged
  pre-softmax logits, class tokens from nn.Embedding, shared class_embed, cumulative masks).
- `SegViT`: both joined, the final masks bilinearly upsampled to the image size.
- `atm_loss`: the ATM loss (CE with no-object weight 0.1, focal x20, dice x1), written per image
  over the classes present, like the reference.
- `load_*_from_flax`: copy weights from our Flax params (unboxed numpy pytree) into these modules
  and into transformers' ViTModel.
- `SegViTShrunk`: mmseg's ViT with query down-sampling + QU (stock torch TransformerDecoder) +
  single-stage ATM head, its `state_dict()` keys the names of the authors' release;
  `official_state_dict` / `load_official_state_dict` give `SegViT` the release's names;
  `add_atm_loss_` gives either the release's loss buffers (`empty_weight`).
- `randomize_params` / `randomize_torch_` / `randomize_module_`: random weights of a useful
  scale for the parity tests (the last also moves BatchNorm running statistics).

Tensors are (B, C, H, W) images in, and (B, h, w, D) token grids out, like the Flax model.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------
# ViT


class ViTAttention(nn.Module):
  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    hd = d // self.num_heads
    q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, hd).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
    out = attn.softmax(dim=-1) @ v  # (b, h, n, hd)
    return self.proj(out.transpose(1, 2).reshape(b, n, d))


class ViTBlock(nn.Module):
  def __init__(self, dim: int, num_heads: int, mlp_dim: int):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = ViTAttention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.fc1 = nn.Linear(dim, mlp_dim)
    self.fc2 = nn.Linear(mlp_dim, dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))  # exact (erf) GELU


class ViT(nn.Module):
  def __init__(self, width, depth, mlp_dim, num_heads, patch_size=16, posemb_grid=(14, 14),
               cls_token=True, cls_in_blocks=True, final_norm=True, in_chans=3):
    super().__init__()
    self.patch_size = patch_size
    self.posemb_grid = tuple(posemb_grid)
    self.has_cls = cls_token
    self.cls_in_blocks = cls_in_blocks and cls_token
    self.patch_embed = nn.Conv2d(in_chans, width, patch_size, stride=patch_size)
    n_pos = posemb_grid[0] * posemb_grid[1] + int(cls_token)
    self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, width))
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if cls_token else None
    self.blocks = nn.ModuleList(ViTBlock(width, num_heads, mlp_dim) for _ in range(depth))
    self.norm = nn.LayerNorm(width, eps=1e-6) if final_norm else None

  def forward(self, images):
    b = images.shape[0]
    x = self.patch_embed(images)  # (b, d, gh, gw)
    d, gh, gw = x.shape[1:]
    x = x.flatten(2).transpose(1, 2)
    n_cls = int(self.has_cls)
    pos = self.pos_embed[:, n_cls:].reshape(1, *self.posemb_grid, d).permute(0, 3, 1, 2)
    if (gh, gw) != self.posemb_grid:
      pos = F.interpolate(pos, size=(gh, gw), mode="bicubic", align_corners=False)
    x = x + pos.permute(0, 2, 3, 1).reshape(1, gh * gw, d)
    n_prefix = 0
    if self.cls_in_blocks:
      cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
      x = torch.cat([cls, x], dim=1)
      n_prefix = 1
    blocks = []
    for blk in self.blocks:
      x = blk(x)
      blocks.append(x[:, n_prefix:].reshape(b, gh, gw, d))
    if self.norm is not None:
      x = self.norm(x)
    return x[:, n_prefix:].reshape(b, gh, gw, d), blocks


# ----------------------------------------------------------------------------------------------
# ATM head


class CrossAttention(nn.Module):
  """Separate q/k/v/proj Linear layers; returns (out, head-averaged pre-softmax logits)."""

  def __init__(self, dim: int, num_heads: int, dropout: float = 0.1):
    super().__init__()
    self.num_heads = num_heads
    self.q = nn.Linear(dim, dim)
    self.k = nn.Linear(dim, dim)
    self.v = nn.Linear(dim, dim)
    self.proj = nn.Linear(dim, dim)
    self.attn_drop = nn.Dropout(dropout)

  def forward(self, x, mem):
    b, nq, d = x.shape
    nk = mem.shape[1]
    h, hd = self.num_heads, d // self.num_heads
    q = self.q(x).reshape(b, nq, h, hd).transpose(1, 2)
    k = self.k(mem).reshape(b, nk, h, hd).transpose(1, 2)
    v = self.v(mem).reshape(b, nk, h, hd).transpose(1, 2)
    logits = (q @ k.transpose(-2, -1)) * hd**-0.5  # (b, h, nq, nk)
    out = self.attn_drop(logits.softmax(dim=-1)) @ v
    out = self.proj(out.transpose(1, 2).reshape(b, nq, d))
    return out, logits.mean(dim=1)


class DecoderLayer(nn.Module):
  def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.1):
    super().__init__()
    self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
    self.cross_attn = CrossAttention(dim, num_heads, dropout)
    self.norm1 = nn.LayerNorm(dim, eps=1e-5)
    self.norm2 = nn.LayerNorm(dim, eps=1e-5)
    self.norm3 = nn.LayerNorm(dim, eps=1e-5)
    self.linear1 = nn.Linear(dim, ffn_dim)
    self.linear2 = nn.Linear(ffn_dim, dim)
    self.dropout = nn.Dropout(dropout)
    self.dropout1 = nn.Dropout(dropout)
    self.dropout2 = nn.Dropout(dropout)
    self.dropout3 = nn.Dropout(dropout)

  def forward(self, x, mem):
    y, _ = self.self_attn(x, x, x, need_weights=False)
    x = self.norm1(x + self.dropout1(y))
    y, mask = self.cross_attn(x, mem)
    x = self.norm2(x + self.dropout2(y))
    y = self.linear2(self.dropout(F.relu(self.linear1(x))))
    x = self.norm3(x + self.dropout3(y))
    return x, mask


class ATMHead(nn.Module):
  def __init__(self, in_dim, num_classes, width, num_heads, num_stages=3, layers_per_stage=3,
               mlp_ratio=4, dropout=0.1):
    super().__init__()
    self.num_classes = num_classes
    self.input_proj = nn.ModuleList(nn.Linear(in_dim, width) for _ in range(num_stages))
    self.proj_norm = nn.ModuleList(nn.LayerNorm(width, eps=1e-5) for _ in range(num_stages))
    self.stages = nn.ModuleList(
        nn.ModuleList(DecoderLayer(width, num_heads, width * mlp_ratio, dropout)
                      for _ in range(layers_per_stage))
        for _ in range(num_stages))
    self.class_tokens = nn.Embedding(num_classes, width)
    self.class_embed = nn.Linear(width, num_classes + 1)

  def forward(self, features):
    """features: list of (B, h, w, D), deepest first. Returns one dict per stage."""
    b, gh, gw, _ = features[0].shape
    x = self.class_tokens.weight.unsqueeze(0).expand(b, -1, -1)
    outputs, total = [], None
    for s, feat in enumerate(features):
      mem = self.proj_norm[s](self.input_proj[s](feat.reshape(b, gh * gw, -1)))
      for layer in self.stages[s]:
        x, mask = layer(x, mem)
      mask = mask.reshape(b, self.num_classes, gh, gw)  # only the last layer's mask is used
      total = mask if total is None else total + mask
      outputs.append({"class_logits": self.class_embed(x), "mask_logits": total})
    return outputs


def semantic_scores(class_logits, mask_logits):
  probs = class_logits.softmax(dim=-1)[..., :-1]
  return torch.einsum("bqc,bqhw->bchw", probs, mask_logits.sigmoid())


class SegViT(nn.Module):
  def __init__(self, num_classes, backbone: dict, head: dict):
    super().__init__()
    head = dict(head)
    self.tap_layers = tuple(sorted(head.pop("tap_layers"), reverse=True))  # deepest first
    self.backbone = ViT(**backbone)
    self.head = ATMHead(backbone["width"], num_classes, num_stages=len(self.tap_layers),
                        **head)

  def forward(self, images):
    _, blocks = self.backbone(images)
    taps = [blocks[i] for i in self.tap_layers]
    stages = self.head(taps)
    masks = F.interpolate(stages[-1]["mask_logits"], size=images.shape[-2:], mode="bilinear",
                          align_corners=False)
    return {"class_logits": stages[-1]["class_logits"], "mask_logits": masks,
            "aux_outputs": stages[:-1], "stages": stages, "taps": taps,
            "semantic_scores": semantic_scores(stages[-1]["class_logits"], masks)}


# ----------------------------------------------------------------------------------------------
# ATM loss


def _focal(logits, targets, alpha=0.25, gamma=2.0):
  """Per-pixel sigmoid focal loss."""
  p = logits.sigmoid()
  ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
  p_t = p * targets + (1 - p) * (1 - targets)
  return (alpha * targets + (1 - alpha) * (1 - targets)) * ce * (1 - p_t) ** gamma


def _terms(class_logits, mask_logits, labels, num_classes, ignore_in_masks, ignore_index,
           no_object_weight):
  b, k = class_logits.shape[:2]
  masks = F.interpolate(mask_logits, size=labels.shape[-2:], mode="bilinear",
                        align_corners=False)
  target_cls = torch.full((b, k), num_classes, dtype=torch.long)
  focal_sum = dice_sum = masks.new_zeros(())
  num_masks = 0
  for i in range(b):
    present = [c for c in torch.unique(labels[i]).tolist() if c != ignore_index]
    num_masks += len(present)
    if ignore_in_masks:
      valid = labels[i] != ignore_index
    else:
      valid = torch.ones_like(labels[i], dtype=torch.bool)
    for c in present:
      target_cls[i, c] = c
      logit = masks[i, c][valid]
      t = (labels[i][valid] == c).to(masks.dtype)
      focal_sum = focal_sum + _focal(logit, t).mean()
      p = logit.sigmoid()
      dice_sum = dice_sum + 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
  weight = torch.ones(num_classes + 1, dtype=class_logits.dtype)
  weight[-1] = no_object_weight
  ce = F.cross_entropy(class_logits.reshape(b * k, -1), target_cls.reshape(-1), weight=weight)
  n = max(num_masks, 1)
  return ce, focal_sum / n, dice_sum / n


def atm_loss(outputs, labels, num_classes, ignore_in_masks=False, ignore_index=255,
             ce_weight=1.0, focal_weight=20.0, dice_weight=1.0, no_object_weight=0.1):
  """outputs: dict with class_logits, mask_logits, aux_outputs (list of dicts). labels (B, H, W)
  long. Returns (total, dict of weighted terms) with the same names as the Flax loss."""
  outs = [("", outputs)] + [(f"_{i}", a) for i, a in enumerate(outputs.get("aux_outputs", []))]
  losses = {}
  for suffix, out in outs:
    ce, focal, dice = _terms(out["class_logits"], out["mask_logits"], labels, num_classes,
                             ignore_in_masks, ignore_index, no_object_weight)
    losses["loss_ce" + suffix] = ce_weight * ce
    losses["loss_mask" + suffix] = focal_weight * focal
    losses["loss_dice" + suffix] = dice_weight * dice
  return sum(losses.values()), losses


# ----------------------------------------------------------------------------------------------
# Weight copy from Flax params (a nested dict of numpy arrays, LogicallyPartitioned unboxed)


def _set(param: torch.Tensor, value) -> None:
  value = torch.as_tensor(np.array(value, copy=True), dtype=param.dtype)
  if tuple(value.shape) != tuple(param.shape):
    raise ValueError(f"shape {tuple(value.shape)} != {tuple(param.shape)}")
  with torch.no_grad():
    param.copy_(value)


def dense_w(p):
  """Flax Dense kernel (in, out) -> torch (out, in)."""
  return np.asarray(p["kernel"]).T


def head_proj_w(p):
  """q/k/v kernel -> torch (heads*head_dim, D), bias flattened. Accepts both layouts our
  Attention has used: DenseGeneral (D, heads, head_dim) and plain Dense (D, D) with heads
  contiguous along the output axis (the same memory order)."""
  k = np.asarray(p["kernel"])
  return k.reshape(k.shape[0], -1).T, np.asarray(p["bias"]).reshape(-1)


def out_proj_w(p):
  """Output kernel, DenseGeneral (heads, head_dim, D) or Dense (D, D) -> torch (D, D)."""
  k = np.asarray(p["kernel"])
  return k.reshape(-1, k.shape[-1]).T, np.asarray(p["bias"])


def _set_ln(ln: nn.LayerNorm, p):
  _set(ln.weight, p["scale"])
  _set(ln.bias, p["bias"])


def _set_linear(lin: nn.Linear, p):
  _set(lin.weight, dense_w(p))
  _set(lin.bias, p["bias"])


def load_vit_from_flax(model: ViT, p) -> None:
  _set(model.patch_embed.weight, np.transpose(np.asarray(p["embedding"]["kernel"]), (3, 2, 0, 1)))
  _set(model.patch_embed.bias, p["embedding"]["bias"])
  _set(model.pos_embed, p["pos_embedding"])
  if model.cls_token is not None:
    _set(model.cls_token, p["cls"])
  for i, blk in enumerate(model.blocks):
    bp = p[f"encoderblock_{i}"]
    _set_ln(blk.norm1, bp["norm1"])
    _set_ln(blk.norm2, bp["norm2"])
    qkv = [head_proj_w(bp["attn"][n]) for n in ("query", "key", "value")]
    _set(blk.attn.qkv.weight, np.concatenate([w for w, _ in qkv], 0))
    _set(blk.attn.qkv.bias, np.concatenate([b for _, b in qkv], 0))
    w, b = out_proj_w(bp["attn"]["out"])
    _set(blk.attn.proj.weight, w)
    _set(blk.attn.proj.bias, b)
    _set_linear(blk.fc1, bp["mlp"]["fc1"])
    _set_linear(blk.fc2, bp["mlp"]["fc2"])
  if model.norm is not None:
    _set_ln(model.norm, p["encoder_norm"])


def load_atm_from_flax(head: ATMHead, p) -> None:
  _set(head.class_tokens.weight, p["class_tokens"])
  _set_linear(head.class_embed, p["class_embed"])
  for s, stage in enumerate(head.stages):
    _set_linear(head.input_proj[s], p[f"input_proj_{s}"])
    _set_ln(head.proj_norm[s], p[f"proj_norm_{s}"])
    for j, layer in enumerate(stage):
      lp = p[f"decoder_{s}_layer_{j}"]
      sa = [head_proj_w(lp["self_attn"][n]) for n in ("query", "key", "value")]
      _set(layer.self_attn.in_proj_weight, np.concatenate([w for w, _ in sa], 0))
      _set(layer.self_attn.in_proj_bias, np.concatenate([b for _, b in sa], 0))
      w, b = out_proj_w(lp["self_attn"]["out"])
      _set(layer.self_attn.out_proj.weight, w)
      _set(layer.self_attn.out_proj.bias, b)
      for name, lin in (("query", layer.cross_attn.q), ("key", layer.cross_attn.k),
                        ("value", layer.cross_attn.v)):
        w, b = head_proj_w(lp["cross_attn"][name])
        _set(lin.weight, w)
        _set(lin.bias, b)
      w, b = out_proj_w(lp["cross_attn"]["out"])
      _set(layer.cross_attn.proj.weight, w)
      _set(layer.cross_attn.proj.bias, b)
      for n in ("norm1", "norm2", "norm3"):
        _set_ln(getattr(layer, n), lp[n])
      _set_linear(layer.linear1, lp["mlp"]["fc1"])
      _set_linear(layer.linear2, lp["mlp"]["fc2"])


def load_segvit_from_flax(model: SegViT, params) -> None:
  load_vit_from_flax(model.backbone, params["backbone"])
  load_atm_from_flax(model.head, params["head"])


def hf_vit_state_dict_from_flax(p, depth: int) -> dict[str, np.ndarray]:
  """State dict for transformers' ViTModel (v5 names, add_pooling_layer=False)."""
  sd = {
      "embeddings.cls_token": np.asarray(p["cls"]),
      "embeddings.position_embeddings": np.asarray(p["pos_embedding"]),
      "embeddings.patch_embeddings.projection.weight":
          np.transpose(np.asarray(p["embedding"]["kernel"]), (3, 2, 0, 1)),
      "embeddings.patch_embeddings.projection.bias": np.asarray(p["embedding"]["bias"]),
      "layernorm.weight": np.asarray(p["encoder_norm"]["scale"]),
      "layernorm.bias": np.asarray(p["encoder_norm"]["bias"]),
  }
  for i in range(depth):
    bp, pre = p[f"encoderblock_{i}"], f"layers.{i}."
    for flax_name, hf_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      w, b = head_proj_w(bp["attn"][flax_name])
      sd[pre + f"attention.{hf_name}.weight"], sd[pre + f"attention.{hf_name}.bias"] = w, b
    w, b = out_proj_w(bp["attn"]["out"])
    sd[pre + "attention.o_proj.weight"], sd[pre + "attention.o_proj.bias"] = w, b
    for flax_name, hf_name in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
      sd[pre + hf_name + ".weight"] = np.asarray(bp[flax_name]["scale"])
      sd[pre + hf_name + ".bias"] = np.asarray(bp[flax_name]["bias"])
    for n in ("fc1", "fc2"):
      sd[pre + f"mlp.{n}.weight"] = dense_w(bp["mlp"][n])
      sd[pre + f"mlp.{n}.bias"] = np.asarray(bp["mlp"][n]["bias"])
  return sd


def load_hf_vit_from_flax(hf_model: nn.Module, p, depth: int) -> None:
  sd = hf_vit_state_dict_from_flax(p, depth)
  target = hf_model.state_dict()
  if set(sd) != set(target):
    raise KeyError(f"missing {sorted(set(target) - set(sd))}, "
                   f"unexpected {sorted(set(sd) - set(target))}")
  for k, v in sd.items():
    _set(target[k], v)  # state_dict() tensors share storage with the parameters


# ----------------------------------------------------------------------------------------------
# Test support: replace every Flax parameter by a random value of a useful scale, so that biases,
# LayerNorm affines, class tokens and position embeddings all matter (the default init zeroes
# biases and makes the attention logits tiny) and every weight-copy mistake shows.


def randomize_params(tree, seed: int = 0, gain: float = 1.0):
  """Nested dict of arrays -> same structure, float32 numpy, random values."""
  rng = np.random.default_rng(seed)

  def walk(node, path):
    if isinstance(node, dict) or hasattr(node, "items"):
      return {k: walk(v, path + (k,)) for k, v in node.items()}
    shape = np.shape(node)
    name, parent = path[-1], (path[-2] if len(path) > 1 else "")
    z = rng.standard_normal(shape)
    if name == "scale":
      v = 1.0 + 0.2 * z
    elif name == "bias":
      v = 0.2 * z
    elif name == "kernel":
      fan_in = shape[0] if parent in ("query", "key", "value") else int(np.prod(shape[:-1]))
      v = gain * z / np.sqrt(fan_in)
    elif name == "class_tokens":
      v = z
    else:  # pos_embedding, cls
      v = 0.5 * z
    return v.astype(np.float32)

  return walk(tree, ())


# ----------------------------------------------------------------------------------------------
# SegViT-Shrunk, and the state-dict names of the authors' release (mmseg 0.24, zbwxp/SegVit:
# `TPNATMHead`, `vit_shrink`), written from the paper (SegViT Sec. 3.2, "The Shrunk
# structure.") and the release's module structure.
#
# `SegViTShrunk`'s `state_dict()` keys ARE the release's names (backbone.* / decode_head.*): its
# ViT is mmseg's (nn.MultiheadAttention with packed in_proj, `ffn.layers.0.0` / `ffn.layers.1`),
# its QU decoders are STOCK torch nn.TransformerDecoder / nn.TransformerDecoderLayer modules
# (sequence-first, as the release), its single-stage ATM head uses the release's module names.
# The ATM model above (`SegViT`) keeps its own names; `official_state_dict` /
# `load_official_state_dict` rename them to and from the release's.

import re  # noqa: E402  (used by this section only)


class MMSegFFN(nn.Module):
  """mmcv FFN: `layers.0.0` (fc1, GELU inside the inner Sequential), `layers.1` (fc2)."""

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.GELU()),
                                nn.Linear(hidden, dim))

  def forward(self, x):
    return self.layers(x)


class MMSegAttention(nn.Module):
  """mmcv MultiheadAttention: a torch nn.MultiheadAttention under `attn`."""

  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

  def forward(self, query, key_value):
    return self.attn(query, key_value, key_value, need_weights=False)[0]


class MMSegBlock(nn.Module):
  """mmseg TransformerEncoderLayer (pre-norm, LN eps 1e-6 as SegViT's configs). With `queries`
  (query down-sampling), the attention's queries and the residual come from them, keys and
  values from all of `x` (release: vit_shrink's ShrinkLayer)."""

  def __init__(self, dim: int, num_heads: int, mlp_dim: int):
    super().__init__()
    self.ln1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = MMSegAttention(dim, num_heads)
    self.ln2 = nn.LayerNorm(dim, eps=1e-6)
    self.ffn = MMSegFFN(dim, mlp_dim)

  def forward(self, x, queries=None):
    q = x if queries is None else queries
    x = q + self.attn(self.ln1(q), self.ln1(x))
    return x + self.ffn(self.ln2(x))


class MMSegPatchEmbed(nn.Module):
  def __init__(self, in_chans: int, dim: int, patch_size: int):
    super().__init__()
    self.projection = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

  def forward(self, x):
    return self.projection(x)


class MMSegViT(nn.Module):
  """mmseg VisionTransformer as SegViT configures it (with_cls_token=False: the cls token and
  its position slot exist but are dropped before the blocks; final_norm=False; bicubic
  position-embedding resize, align_corners=False), plus query down-sampling at `shrink_idx`:
  the top-left token of every 2x2 window queries all tokens; later blocks run on the halved
  grid. Returns the (B, h, w, D) tokens after every block."""

  def __init__(self, width, depth, mlp_dim, num_heads, patch_size=16, posemb_grid=(14, 14),
               shrink_idx=None, in_chans=3):
    super().__init__()
    self.posemb_grid = tuple(posemb_grid)
    self.shrink_idx = shrink_idx
    self.patch_embed = MMSegPatchEmbed(in_chans, width, patch_size)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + posemb_grid[0] * posemb_grid[1], width))
    self.layers = nn.ModuleList(MMSegBlock(width, num_heads, mlp_dim) for _ in range(depth))

  def forward(self, images):
    b = images.shape[0]
    x = self.patch_embed(images)  # (b, d, gh, gw)
    d, gh, gw = x.shape[1:]
    pos = self.pos_embed[:, 1:].reshape(1, *self.posemb_grid, d).permute(0, 3, 1, 2)
    if (gh, gw) != self.posemb_grid:
      pos = F.interpolate(pos, size=(gh, gw), mode="bicubic", align_corners=False)
    x = x.flatten(2).transpose(1, 2) + pos.flatten(2).transpose(1, 2)
    blocks = []
    for i, layer in enumerate(self.layers):
      if i == self.shrink_idx:
        down = x.reshape(b, gh, gw, d)[:, ::2, ::2]
        gh, gw = down.shape[1:3]
        x = layer(x, queries=down.reshape(b, gh * gw, d))
      else:
        x = layer(x)
      blocks.append(x.reshape(b, gh, gw, d))
    return blocks


class ATMDecoderLayer(DecoderLayer):
  """`DecoderLayer` under the release's name for its cross-attention, `multihead_attn` (the
  release's TPN_DecoderLayer: a torch TransformerDecoderLayer whose multihead_attn is replaced
  by separate q, k, v, proj Linear layers). Same computation: the module is only renamed."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.multihead_attn = self._modules.pop("cross_attn")

  @property
  def cross_attn(self):  # what DecoderLayer.forward calls
    return self.multihead_attn


class ATMDecoder(nn.Module):
  """The release's TPN_Decoder: `layers.{j}`; every layer's (tokens, mask) returned."""

  def __init__(self, make_layer, num_layers: int):
    super().__init__()
    self.layers = nn.ModuleList(make_layer() for _ in range(num_layers))

  def forward(self, x, mem):
    outs = []
    for layer in self.layers:
      x, mask = layer(x, mem)
      outs.append((x, mask))
    return outs


class ATMSingleHead(nn.Module):
  """SegViT-Shrunk's single-stage ATM head (no input projection): `q` (class tokens),
  `decoder_1.layers.{j}`, `class_embed`. EVERY layer emits class logits and its own mask
  (head-averaged pre-softmax cross-attention logits, not summed across layers)."""

  def __init__(self, num_classes, width, num_heads, num_layers=3, mlp_ratio=4, dropout=0.1):
    super().__init__()
    self.num_classes = num_classes
    self.decoder_1 = ATMDecoder(
        lambda: ATMDecoderLayer(width, num_heads, width * mlp_ratio, dropout), num_layers)
    self.q = nn.Embedding(num_classes, width)
    self.class_embed = nn.Linear(width, num_classes + 1)

  def forward(self, features):
    """features: [(B, h, w, W)] (one). Returns one dict per layer."""
    (feat,) = features
    b, gh, gw, w = feat.shape
    x = self.q.weight.unsqueeze(0).expand(b, -1, -1)
    return [{"class_logits": self.class_embed(x),
             "mask_logits": mask.reshape(b, self.num_classes, gh, gw)}
            for x, mask in self.decoder_1(x, feat.reshape(b, gh * gw, w))]


class TPNATMHead(nn.Module):
  """SegViT-Shrunk's head: query up-sampling (QU) + `ATMSingleHead` (under `atm`).

  QU: `q` holds one query per cell of the crop's 1/16 grid (`query_grid`, row-major). For each
  tapped feature, SHALLOW FIRST: Linear + LayerNorm (`input_proj_{s+1}`, `proj_norm_{s+1}`)
  gives the memory of a stock nn.TransformerDecoder (`decoder_{s+1}`; post-norm, ReLU,
  dim_feedforward 4 x width, dropout) that refines the queries. The result, on the 1/16 grid,
  is the ATM head's memory.

  The release ties the query count to the crop (it fails on other grids). On another grid
  (that of the first tapped feature) this reference resizes the query grid bicubically
  (align_corners=False), as our model does; at the crop it is the release's computation."""

  def __init__(self, in_dim, num_classes, width, num_heads, query_grid, num_stages=2,
               qu_layers=3, atm_layers=3, mlp_ratio=4, dropout=0.1):
    super().__init__()
    self.query_grid = tuple(query_grid)
    self.num_stages = num_stages
    for s in range(num_stages):
      self.add_module(f"input_proj_{s + 1}", nn.Linear(in_dim, width))
      self.add_module(f"proj_norm_{s + 1}", nn.LayerNorm(width, eps=1e-5))
      layer = nn.TransformerDecoderLayer(width, num_heads, dim_feedforward=width * mlp_ratio,
                                         dropout=dropout)
      self.add_module(f"decoder_{s + 1}", nn.TransformerDecoder(layer, qu_layers))
    self.q = nn.Embedding(self.query_grid[0] * self.query_grid[1], width)
    self.atm = ATMSingleHead(num_classes, width, num_heads, atm_layers, mlp_ratio, dropout)

  def queries(self, grid):
    """(gh * gw, W): the stored queries, resized to `grid` when it is not the stored one."""
    q = self.q.weight
    if tuple(grid) == self.query_grid:
      return q
    q = q.reshape(1, *self.query_grid, -1).permute(0, 3, 1, 2)
    q = F.interpolate(q, size=tuple(grid), mode="bicubic", align_corners=False)
    return q.flatten(2)[0].transpose(0, 1)

  def forward(self, features):
    """features: tapped (B, h, w, D), shallow first; the first on the 1/16 grid."""
    b, gh, gw, _ = features[0].shape
    x = self.queries((gh, gw)).unsqueeze(1).expand(-1, b, -1)  # (N, B, W), sequence first
    for s, feat in enumerate(features):
      mem = getattr(self, f"proj_norm_{s + 1}")(
          getattr(self, f"input_proj_{s + 1}")(feat.reshape(b, -1, feat.shape[-1])))
      x = getattr(self, f"decoder_{s + 1}")(x, mem.transpose(0, 1))
    return self.atm([x.transpose(0, 1).reshape(b, gh, gw, -1)])


class SegViTShrunk(nn.Module):
  """MMSegViT with query down-sampling + TPNATMHead; `state_dict()` keys are the release's.
  backbone: width, depth, mlp_dim, num_heads, patch_size, posemb_grid, shrink_idx.
  head: tap_layers, width, num_heads, query_grid, qu_layers, atm_layers (+ mlp_ratio, dropout)."""

  def __init__(self, num_classes, backbone: dict, head: dict):
    super().__init__()
    head = dict(head)
    self.tap_layers = tuple(sorted(head.pop("tap_layers")))  # shallow first
    self.backbone = MMSegViT(**backbone)
    self.decode_head = TPNATMHead(backbone["width"], num_classes,
                                  num_stages=len(self.tap_layers), **head)

  def forward(self, images):
    blocks = self.backbone(images)
    taps = [blocks[i] for i in self.tap_layers]
    layers = self.decode_head(taps)
    masks = F.interpolate(layers[-1]["mask_logits"], size=images.shape[-2:], mode="bilinear",
                          align_corners=False)
    return {"class_logits": layers[-1]["class_logits"], "mask_logits": masks,
            "aux_outputs": layers[:-1], "taps": taps,
            "semantic_scores": semantic_scores(layers[-1]["class_logits"], masks)}


# The release's names for `SegViT`'s state dict (regex on our reference's key -> function of
# the match). The ATM stages are deepest first in both, numbered from 1 in the release.
_OFFICIAL_NAMES = (
    (r"backbone\.(cls_token|pos_embed)", lambda m: f"backbone.{m[1]}"),
    (r"backbone\.patch_embed\.(weight|bias)", lambda m: f"backbone.patch_embed.projection.{m[1]}"),
    (r"backbone\.blocks\.(\d+)\.norm([12])\.(weight|bias)",
     lambda m: f"backbone.layers.{m[1]}.ln{m[2]}.{m[3]}"),
    (r"backbone\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)",
     lambda m: f"backbone.layers.{m[1]}.attn.attn.in_proj_{m[2]}"),
    (r"backbone\.blocks\.(\d+)\.attn\.proj\.(weight|bias)",
     lambda m: f"backbone.layers.{m[1]}.attn.attn.out_proj.{m[2]}"),
    (r"backbone\.blocks\.(\d+)\.fc1\.(weight|bias)",
     lambda m: f"backbone.layers.{m[1]}.ffn.layers.0.0.{m[2]}"),
    (r"backbone\.blocks\.(\d+)\.fc2\.(weight|bias)",
     lambda m: f"backbone.layers.{m[1]}.ffn.layers.1.{m[2]}"),
    (r"head\.(input_proj|proj_norm)\.(\d+)\.(weight|bias)",
     lambda m: f"decode_head.{m[1]}_{int(m[2]) + 1}.{m[3]}"),
    (r"head\.stages\.(\d+)\.(\d+)\.cross_attn\.(.*)",
     lambda m: f"decode_head.decoder_{int(m[1]) + 1}.layers.{m[2]}.multihead_attn.{m[3]}"),
    (r"head\.stages\.(\d+)\.(\d+)\.(.*)",
     lambda m: f"decode_head.decoder_{int(m[1]) + 1}.layers.{m[2]}.{m[3]}"),
    (r"head\.class_tokens\.weight", lambda m: "decode_head.q.weight"),
    (r"head\.class_embed\.(weight|bias)", lambda m: f"decode_head.class_embed.{m[1]}"),
    (r"head\.loss_decode\.(.*)", lambda m: f"decode_head.loss_decode.{m[1]}"),  # add_atm_loss_
)


def official_name(key: str) -> str:
  """A `SegViT` state-dict key -> the release's name for it."""
  for pattern, name in _OFFICIAL_NAMES:
    m = re.fullmatch(pattern, key)
    if m:
      return name(m)
  raise KeyError(f"no release name for {key!r}")


def official_state_dict(model: SegViT) -> dict[str, torch.Tensor]:
  """`model.state_dict()` under the release's names (for an ATM-head SegViT)."""
  return {official_name(k): v for k, v in model.state_dict().items()}


def load_official_state_dict(model: SegViT, state: dict) -> None:
  """Loads a release-named state dict into `SegViT`, strictly (every key, nothing else)."""
  ours = {official_name(k): k for k in model.state_dict()}
  unknown = sorted(set(state) - set(ours))
  if unknown:
    raise KeyError(f"keys SegViT does not have: {unknown[:20]}")
  model.load_state_dict({ours[k]: v for k, v in state.items()}, strict=True)


class ATMLossBuffers(nn.Module):
  """What the release's ATM loss holds in a state dict: `criterion.empty_weight` (its
  SetCriterion's cross-entropy class weights, ones with the no-object weight last; a buffer)."""

  def __init__(self, num_classes: int, no_object_weight: float = 0.1):
    super().__init__()
    self.criterion = nn.Module()
    weights = torch.ones(num_classes + 1)
    weights[-1] = no_object_weight
    self.criterion.register_buffer("empty_weight", weights)


def add_atm_loss_(model: nn.Module, no_object_weight: float = 0.1) -> nn.Module:
  """Gives `SegViT` / `SegViTShrunk` the loss modules the release's heads own, in place, so
  their state dicts hold the release's buffers: `decode_head.loss_decode` (SegViT's
  `head.loss_decode`, renamed by `official_name`), and for Shrunk also
  `decode_head.atm.loss_decode` (TPNATMHead and its ATMSingleHead each build the loss)."""
  heads = ((model.decode_head, model.decode_head.atm) if isinstance(model, SegViTShrunk)
           else (model.head,))
  for head in heads:  # the ATM head (the last) knows the classes
    head.loss_decode = ATMLossBuffers(heads[-1].num_classes, no_object_weight)
  return model


def randomize_module_(model: torch.nn.Module, seed: int) -> None:
  """Every parameter random (fan-in-scaled weights, norm scales around 1, biases around 0) and
  the BatchNorm running statistics away from their (0, 1) defaults."""
  g = torch.Generator().manual_seed(seed)
  randn = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype)  # noqa: E731
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim > 1:
        p.copy_(randn(p) / np.sqrt(np.prod(p.shape[1:])))
      elif name.endswith("weight"):
        p.copy_(1.0 + 0.2 * randn(p))
      else:
        p.copy_(0.2 * randn(p))
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.3 * randn(b))
      elif name.endswith("running_var"):
        b.copy_(torch.exp(0.5 * randn(b)))


def randomize_torch_(model: nn.Module, seed: int = 0, gain: float = 1.0) -> nn.Module:
  """Random values of a useful scale in every parameter, in place (the counterpart of
  `randomize_params` for torch modules): Linear / Conv / packed in_proj weights
  z * gain / sqrt(fan_in), biases 0.2 z, LayerNorm weights 1 + 0.2 z, embeddings (class tokens,
  QU queries) z, position embedding and cls token 0.5 z."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      for name, p in module.named_parameters(recurse=False):
        z = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if isinstance(module, nn.LayerNorm) and name == "weight":
          v = 1.0 + 0.2 * z
        elif name.endswith("bias"):
          v = 0.2 * z
        elif isinstance(module, nn.Embedding):
          v = z
        elif name in ("pos_embed", "cls_token"):
          v = 0.5 * z
        else:
          v = gain * z / math.sqrt(int(np.prod(p.shape[1:])))
        p.copy_(v.to(p.dtype))
  return model


def load_segvit_shrunk_from_flax(model: SegViTShrunk, params) -> None:
  """Copies our Flax SegViT-Shrunk parameters into `SegViTShrunk`."""
  bb, p = model.backbone, params["backbone"]
  _set(bb.patch_embed.projection.weight,
       np.transpose(np.asarray(p["embedding"]["kernel"]), (3, 2, 0, 1)))
  _set(bb.patch_embed.projection.bias, p["embedding"]["bias"])
  _set(bb.pos_embed, p["pos_embedding"])
  _set(bb.cls_token, p["cls"])
  for i, layer in enumerate(bb.layers):
    bp = p[f"encoderblock_{i}"]
    _set_ln(layer.ln1, bp["norm1"])
    _set_ln(layer.ln2, bp["norm2"])
    _set_packed_attention(layer.attn.attn, bp["attn"])
    _set_linear(layer.ffn.layers[0][0], bp["mlp"]["fc1"])
    _set_linear(layer.ffn.layers[1], bp["mlp"]["fc2"])
  head, hp = model.decode_head, params["head"]
  _set(head.q.weight, hp["queries"])
  for s in range(head.num_stages):
    _set_linear(getattr(head, f"input_proj_{s + 1}"), hp[f"input_proj_{s}"])
    _set_ln(getattr(head, f"proj_norm_{s + 1}"), hp[f"proj_norm_{s}"])
    for j, layer in enumerate(getattr(head, f"decoder_{s + 1}").layers):
      lp = hp[f"decoder_{s}_layer_{j}"]
      _set_packed_attention(layer.self_attn, lp["self_attn"])
      _set_packed_attention(layer.multihead_attn, lp["cross_attn"])
      _set_linear(layer.linear1, lp["mlp"]["fc1"])
      _set_linear(layer.linear2, lp["mlp"]["fc2"])
      for n in ("norm1", "norm2", "norm3"):
        _set_ln(getattr(layer, n), lp[n])
  atm, ap = head.atm, hp["atm"]
  _set(atm.q.weight, ap["class_tokens"])
  _set_linear(atm.class_embed, ap["class_embed"])
  for j, layer in enumerate(atm.decoder_1.layers):
    lp = ap[f"decoder_0_layer_{j}"]
    _set_packed_attention(layer.self_attn, lp["self_attn"])
    for name, lin in (("query", layer.multihead_attn.q), ("key", layer.multihead_attn.k),
                      ("value", layer.multihead_attn.v), ("out", layer.multihead_attn.proj)):
      cp = lp["cross_attn"][name]
      w, b = head_proj_w(cp) if name != "out" else out_proj_w(cp)
      _set(lin.weight, w)
      _set(lin.bias, b)
    _set_linear(layer.linear1, lp["mlp"]["fc1"])
    _set_linear(layer.linear2, lp["mlp"]["fc2"])
    for n in ("norm1", "norm2", "norm3"):
      _set_ln(getattr(layer, n), lp[n])


def _set_packed_attention(mha: nn.MultiheadAttention, p) -> None:
  """Our query/key/value/out -> torch nn.MultiheadAttention (in_proj = q, k, v stacked)."""
  qkv = [head_proj_w(p[n]) for n in ("query", "key", "value")]
  _set(mha.in_proj_weight, np.concatenate([w for w, _ in qkv], 0))
  _set(mha.in_proj_bias, np.concatenate([b for _, b in qkv], 0))
  w, b = out_proj_w(p["out"])
  _set(mha.out_proj.weight, w)
  _set(mha.out_proj.bias, b)
