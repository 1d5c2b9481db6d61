"""The steps every ViT backbone layout shares after its key table (`rules.to_ours`): the cls
slot of the position table, the ViT config inferred from the converted shapes, the strict
check against our ViT, resampling the position grid and the patch kernel, and the result
(`Converted`: parameters, config, pixel statistics). Also reading one of our backbone bundles
and the pixel-statistics check of `config.model_init`.

Parameters are flat dicts in the layout of `segvit_jax.models.vit` (`rules.Flat`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from segvit_jax import bundle as bundle_lib
from segvit_jax.convert.rules import Flat, flatten, unflatten
from segvit_jax.models import layers, vit

# Pixel statistics the weights were trained with (0-255 scale).
AUGREG_MEAN_STD = ((127.5,) * 3, (127.5,) * 3)
IMAGENET_MEAN_STD = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))

# Heads of the standard widths (Ti, S, M, B, L, H, DINOv2-g): layouts that store attention as
# (D, D) matrices do not record the head count.
HEADS_BY_WIDTH = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16, 1536: 24}


@dataclasses.dataclass
class Converted:
  """A backbone in our layout: flat parameters, the config that runs them, and the pixel
  statistics the weights expect (0-255 scale)."""

  params: Flat
  backbone: dict[str, Any]
  mean: tuple[float, ...]
  std: tuple[float, ...]


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


def infer_backbone(params: Flat, *, num_heads: int | None, source: str,
                   **fields: Any) -> dict[str, Any]:
  """Our ViT config from converted parameter shapes (+ `fields` the layout knows, e.g.
  norm_eps and posemb_resize; with `rope_theta` (RoPE, no position table) also
  `posemb_grid`)."""
  rope = fields.get("rope_theta") is not None
  for key in ("embedding/kernel", *(() if rope else ("pos_embedding",)),
              "encoderblock_0/norm1/scale"):
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
  if rope:
    g = None  # `fields` give the grid
  else:
    g = math.isqrt(params["pos_embedding"].shape[1] - int("cls" in params))
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
  if cfg.get("rope_theta") is not None:
    family, sizes = "dinov3-", ("S", "S+", "B", "L", "L+", "H+", "7B")
    reg = f"-reg{cfg['num_registers']}" if cfg.get("num_registers", 4) != 4 else ""
  else:
    family = "dinov2-" if cfg.get("layerscale") is not None else ""
    sizes = ("Ti", "S", "M", "B", "L", "H", "g")
    reg = f"-reg{cfg['num_registers']}" if cfg.get("num_registers") else ""
  for size in sizes:
    name = f"{family}{size}/{cfg['patch_size']}{reg}"
    try:
      fields = vit.decode_variant(name)
    except ValueError:
      continue
    if all(fields.get(k, d) == cfg.get(k, d) for k, d in (
        ("width", None), ("depth", None), ("mlp_dim", None), ("num_heads", None),
        ("ffn", "mlp"))):
      return name
  return None


def resample(params: Flat, cfg: dict[str, Any], *, grid: tuple[int, int] | None = None,
             patch: int | None = None, posemb_resize: str | None = None,
             patch_resize: str = "bicubic_antialias") -> tuple[Flat, dict[str, Any]]:
  """Resamples the stored position grid to `grid` (with `posemb_resize`, default the model's
  own method) and the patch kernel to `patch` (FlexiViT pseudo-inverse, `patch_resize`).
  A RoPE model (no position table) just records `grid`."""
  params, cfg = dict(params), dict(cfg)
  if grid is not None and cfg.get("rope_theta") is not None:
    cfg["posemb_grid"] = tuple(grid)
  elif grid is not None and tuple(grid) != tuple(cfg["posemb_grid"]):
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


def backbone_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """Flat parameter shapes of our ViT for a backbone config."""
  model = vit.Model(**cfg)
  p, (gh, gw) = cfg["patch_size"], cfg["posemb_grid"]
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, gh * p, gw * p, 3))))
  # Shapes from the boxes directly: unboxing would apply sharding constraints under a mesh.
  return {k: getattr(v, "value", v).shape for k, v in flatten(abstract["params"]).items()}


def check(params: Mapping[str, np.ndarray], cfg: Mapping[str, Any], *, source: str) -> None:
  """Strict comparison with the ViT `cfg` describes (bundle.merge_params' error format)."""
  shapes = backbone_shapes(cfg)
  bundle_lib.merge_params(unflatten({k: jax.ShapeDtypeStruct(s, jnp.float32)
                                     for k, s in shapes.items()}),
                          unflatten(params), source=source)


def read_bundle(path: str) -> Converted:
  """One of our backbone ('vit') bundles."""
  meta = bundle_lib.read_config(path)
  if meta["model"].get("name") != "vit":
    raise ValueError(f"{path} is a {meta['model'].get('name')!r} bundle, not a backbone "
                     "('vit') bundle")
  params = flatten(bundle_lib.load_params(path))
  cfg = dict(meta["model"]["backbone"])
  cfg["posemb_grid"] = tuple(cfg["posemb_grid"])
  return Converted(params, cfg, tuple(meta["mean"]), tuple(meta["std"]))


def warn_pixel_stats(conv: Converted, path: str, mean: Any, std: Any) -> None:
  """Warns when the config's pixel `mean` / `std` (if given) are not those of the weights."""
  for name, want, got in (("mean", conv.mean, mean), ("std", conv.std, std)):
    if got is not None and not np.allclose(want, got, atol=1e-3):
      logging.warning("model_init %s expects pixel %s %s but the config uses %s", path, name,
                      tuple(want), tuple(got))
