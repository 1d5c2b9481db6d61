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
