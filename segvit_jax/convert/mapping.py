"""The machinery every converter shares: reading foreign files, a declarative key-mapping
table (regex on the source key -> our parameter path(s) + a small transform), and the few
whole-model steps (position-embedding cls slot, SwiGLU unpacking, resampling, config
inference).

Parameters travel as flat dicts `{"encoderblock_0/attn/query/kernel": np.ndarray}` in our
layout (the ViT of `segvit_jax.models.vit`); numpy float32 throughout.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from segvit_jax.models import layers, vit

Flat = dict[str, np.ndarray]
Transform = Callable[..., "np.ndarray | Sequence[np.ndarray]"]

# Pixel statistics the weights were trained with (0-255 scale).
AUGREG_MEAN_STD = ((127.5,) * 3, (127.5,) * 3)
IMAGENET_MEAN_STD = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))

# Heads of the standard widths (Ti, S, M, B, L, H, DINOv2-g): layouts that store attention as
# (D, D) matrices do not record the head count.
HEADS_BY_WIDTH = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16, 1536: 24}


# ----------------------------------------------------------------------------------------------
# Transforms: one foreign tensor in, one or more of ours out.

def identity(x):
  return x


def linear(w):
  """torch Linear (out, in) -> Flax Dense (in, out)."""
  return w.T


def conv(w):
  """torch Conv2d (out, in, kh, kw) -> Flax Conv (kh, kw, in, out)."""
  return w.transpose(2, 3, 1, 0)


def split3_linear(w):
  """torch packed q/k/v Linear (3D, D) -> three (D, D) kernels."""
  return [part.T for part in np.split(w, 3, axis=0)]


def split3(b):
  """packed q/k/v bias (3D,) -> three (D,)."""
  return np.split(b, 3, axis=0)


def merge_heads_in(w):
  """big_vision DenseGeneral (D, H, hd) -> (D, H * hd); also bias (H, hd) -> (H * hd,)."""
  return w.reshape(*w.shape[:-2], -1)


def merge_heads_out(w):
  """big_vision DenseGeneral out (H, hd, D) -> (H * hd, D)."""
  return w.reshape(-1, w.shape[-1])


# ----------------------------------------------------------------------------------------------
# Declarative tables

@dataclasses.dataclass(frozen=True)
class Rule:
  """`pattern` (a regex, full match on the source key) maps to `target` (a path template
  formatted with the match groups, or a tuple of them for a split tensor, or None to drop the
  tensor) through `transform`."""

  pattern: str
  target: str | tuple[str, ...] | None
  transform: Transform = identity


def apply_rules(tensors: Mapping[str, np.ndarray], rules: Sequence[Rule], *,
                source: str, layout: str) -> Flat:
  """Maps every source tensor through the first matching rule. Keys no rule knows fail
  with their names (the usual sign of a checkpoint of another model or layout)."""
  compiled = [(re.compile(r.pattern), r) for r in rules]
  out: Flat = {}
  unknown = []
  for key, value in tensors.items():
    for regex, rule in compiled:
      m = regex.fullmatch(key)
      if m:
        break
    else:
      unknown.append(key)
      continue
    if rule.target is None:
      continue
    targets = (rule.target,) if isinstance(rule.target, str) else rule.target
    values = rule.transform(np.asarray(value))
    values = [values] if isinstance(rule.target, str) else list(values)
    for t, v in zip(targets, values, strict=True):
      name = t.format(*m.groups())
      if name in out:
        raise ValueError(f"{source}: two tensors map to {name!r} (second: {key!r})")
      out[name] = np.asarray(v, np.float32)
  if unknown:
    shown = ", ".join(sorted(unknown)[:20]) + (" ..." if len(unknown) > 20 else "")
    raise ValueError(f"{source} is not a {layout} ViT checkpoint: {len(unknown)} tensor(s) "
                     f"this layout does not have: {shown}")
  return out


# ----------------------------------------------------------------------------------------------
# Reading files

def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("reading PyTorch .pth/.bin files needs torch (CPU build is enough): "
                      "pip install torch") from None
  return torch


def _to_numpy(value) -> np.ndarray:
  if value.is_floating_point():
    value = value.float()
  return value.detach().cpu().numpy()


def read_torch(path: str, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """A PyTorch checkpoint as {key: array}: safetensors directly; .pth/.bin through
  `torch.load(weights_only=True)`, refusing files that pickle other Python objects unless
  `trust_pickle`. Unwraps `state_dict` / `model` wrappers; drops non-tensor entries."""
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  torch = _torch()
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    if not trust_pickle:
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ValueError(
          f"{path} holds pickled Python objects besides tensors, so "
          f"torch.load(weights_only=True) refuses it ({reason}). Unpickling it can run "
          "arbitrary code. If you trust where the file comes from, pass --trust-pickle "
          "(Python: trust_pickle=True); or re-save its state dict as .safetensors.") from None
    obj = torch.load(path, map_location="cpu", weights_only=False)
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state dict (key -> tensor), got {type(obj).__name__}")
  return {k: _to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.flax import load_file  # pylint: disable=g-import-not-at-top  (bf16-safe)
  return {k: np.asarray(v, np.float32 if np.issubdtype(v.dtype, np.floating)
                        or v.dtype.name == "bfloat16" else v.dtype)
          for k, v in load_file(path).items()}


def read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (ValueError, OSError, AttributeError) as e:  # not a zip, pickled, or a lone .npy
    raise ValueError(f"{path} is not a readable .npz archive of arrays ({e})") from None


def strip_prefix(tensors: Mapping[str, np.ndarray], prefixes: Iterable[str]):
  """Removes from each key the first of `prefixes` it starts with."""
  out = {}
  for k, v in tensors.items():
    for p in prefixes:
      if k.startswith(p):
        k = k[len(p):]
        break
    out[k] = v
  return out


# ----------------------------------------------------------------------------------------------
# Whole-model steps

def is_square(n: int) -> bool:
  return n > 0 and math.isqrt(n) ** 2 == n


def add_cls_slot(params: Flat, source: str) -> Flat:
  """Our `pos_embedding` always has the cls slot first when the model has a cls token.
  Layouts that give the cls token no position (big_vision, timm `no_embed_class`) store
  (1, N, D): their cls slot is zero. Which one a file has is told by N (1 + g*g vs g*g)."""
  pos = params.get("pos_embedding")
  if pos is None:
    raise ValueError(f"{source}: no position embedding found")
  n = pos.shape[1]
  has_cls = "cls" in params
  if has_cls and is_square(n):
    params["pos_embedding"] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
  elif not is_square(n - int(has_cls)):
    raise ValueError(f"{source}: position embedding {pos.shape} is not a square grid "
                     f"{'(+ cls slot) ' if has_cls else ''}of patches")
  return params


def unpack_swiglu(params: Flat) -> Flat:
  """timm packs DINOv2-g's SwiGLU as fc1 (D, 2h) = [gate | value] and fc2 (h, D): a plain
  MLP has fc1 (D, h). Rename to our w1 / w2 / w3 when the shapes say SwiGLU."""
  out = dict(params)
  for key in [k for k in params if k.endswith("mlp/fc1/kernel")]:
    base = key[:-len("fc1/kernel")]
    if params[key].shape[1] != 2 * params[base + "fc2/kernel"].shape[0]:
      continue
    for part in ("kernel", "bias"):
      w1, w2 = np.split(out.pop(f"{base}fc1/{part}"), 2, axis=-1)
      out[f"{base}w1/{part}"], out[f"{base}w2/{part}"] = w1, w2
      out[f"{base}w3/{part}"] = out.pop(f"{base}fc2/{part}")
  return out


def split_swiglu(w):
  """packed [gate; value] torch Linear (2h, D) -> two Flax (D, h) kernels (bias: two (h,))."""
  return [part.T if part.ndim == 2 else part for part in np.split(w, 2, axis=0)]


def infer_backbone(params: Flat, *, num_heads: int | None, source: str,
                   **fields: Any) -> dict[str, Any]:
  """Our ViT config from converted parameter shapes (+ `fields` the layout knows, e.g.
  norm_eps and posemb_resize)."""
  for key in ("embedding/kernel", "pos_embedding", "encoderblock_0/norm1/scale"):
    if key not in params:
      raise ValueError(f"{source}: no tensor maps to {key!r}; is this a ViT checkpoint?")
  kernel = params["embedding/kernel"]
  width = kernel.shape[-1]
  depth = len({k.split("/")[0] for k in params if k.startswith("encoderblock_")})
  if num_heads is None:
    if width not in HEADS_BY_WIDTH:
      raise ValueError(f"{source}: width {width} is not a standard ViT width "
                       f"({sorted(HEADS_BY_WIDTH)}); give the number of heads (--num-heads)")
    num_heads = HEADS_BY_WIDTH[width]
  swiglu = "encoderblock_0/mlp/w1/kernel" in params
  fc1 = params.get("encoderblock_0/mlp/" + ("w1" if swiglu else "fc1") + "/kernel")
  mlp_dim = fc1.shape[1] if fc1 is not None else 4 * width  # missing: `check` names it
  n = params["pos_embedding"].shape[1] - int("cls" in params)
  g = math.isqrt(n)
  cfg = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
             patch_size=kernel.shape[0], posemb_grid=(g, g), cls_token="cls" in params,
             cls_in_blocks=True, num_registers=(params["registers"].shape[1]
                                                if "registers" in params else 0),
             layerscale=1e-5 if "encoderblock_0/ls1" in params else None,
             ffn="swiglu" if swiglu else "mlp", final_norm="encoder_norm/scale" in params)
  if kernel.shape[0] != kernel.shape[1]:
    raise ValueError(f"{source}: non-square patch kernel {kernel.shape[:2]}")
  cfg.update(fields)
  cfg["variant"] = variant_name(cfg)
  return cfg


def variant_name(cfg: Mapping[str, Any]) -> str | None:
  """The variant name whose sizes match `cfg`, if any (informational: explicit fields win)."""
  family = "dinov2-" if cfg.get("layerscale") is not None else ""
  reg = f"-reg{cfg['num_registers']}" if cfg.get("num_registers") else ""
  for size in ("Ti", "S", "M", "B", "L", "H", "g"):
    name = f"{family}{size}/{cfg['patch_size']}{reg}"
    try:
      sizes = vit.decode_variant(name)
    except ValueError:
      continue
    if all(sizes[k] == cfg[k] for k in ("width", "depth", "mlp_dim", "num_heads")):
      return name
  return None


def resample(params: Flat, cfg: dict[str, Any], *, grid: tuple[int, int] | None = None,
             patch: int | None = None, posemb_resize: str | None = None,
             patch_resize: str = "bicubic_antialias") -> tuple[Flat, dict[str, Any]]:
  """Resamples the stored position grid to `grid` (with `posemb_resize`, default the model's
  own method) and the patch kernel to `patch` (FlexiViT pseudo-inverse, `patch_resize`)."""
  params, cfg = dict(params), dict(cfg)
  if grid is not None and tuple(grid) != tuple(cfg["posemb_grid"]):
    pos = params["pos_embedding"]
    n_cls = int(cfg["cls_token"])
    d = pos.shape[-1]
    grid_pos = pos[:, n_cls:].reshape(1, *cfg["posemb_grid"], d)
    grid_pos = np.asarray(layers.resize_posemb(
        grid_pos.astype(np.float32), tuple(grid), posemb_resize or cfg["posemb_resize"]))
    params["pos_embedding"] = np.concatenate(
        [pos[:, :n_cls], grid_pos.reshape(1, -1, d)], axis=1).astype(np.float32)
    cfg["posemb_grid"] = tuple(grid)
  if patch is not None and patch != cfg["patch_size"]:
    params["embedding/kernel"] = np.asarray(layers.resample_patch_kernel(
        params["embedding/kernel"], (patch, patch), method=patch_resize), np.float32)
    cfg["patch_size"] = patch
  cfg["variant"] = variant_name(cfg)
  return params, cfg


@dataclasses.dataclass
class Converted:
  """A backbone in our layout: flat parameters, the ViT config that runs them, and the pixel
  statistics the weights expect (0-255 scale)."""

  params: Flat
  backbone: dict[str, Any]
  mean: tuple[float, ...]
  std: tuple[float, ...]
