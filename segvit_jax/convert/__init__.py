"""Converters from the public forms of AugReg and DINOv2 weights into our ViT, and loading them
into a segmentor's backbone (`config.model_init`); whole SegViT models of the authors' release,
both ways.

  python -m segvit_jax.convert SRC OUT --from FORMAT [--image-size S] [--patch-size P] ...
  python -m segvit_jax.convert SRC.pth OUT --from segvit-official --config configs/X.py[:ARG]
  python -m segvit_jax.convert BUNDLE OUT.pth --to segvit-official
  python -m segvit_jax.convert SRC OUT --from segformer-official|hf-segformer [--config X.py]
  python -m segvit_jax.convert BUNDLE OUT --to segformer-official|hf-segformer
  python -m segvit_jax.convert SRC OUT --from eomt-official|hf-eomt [--config X.py]
  python -m segvit_jax.convert BUNDLE OUT --to eomt-official|hf-eomt

Formats (one module each, a declarative key table plus small transforms):
  augreg-npz   big_vision / vision_transformer .npz, every flavour      (`augreg.py`)
  timm         timm .safetensors / .pth, AugReg and DINOv2 models        (`timm.py`)
  dinov2       facebookresearch/dinov2 .pth, registers, SwiGLU, chunks  (`dinov2.py`)
  hf-vit       transformers ViTModel `save_pretrained` directory        (`hf.py`)
  hf-dinov2    transformers Dinov2Model / Dinov2WithRegistersModel dir  (`hf.py`)
  bundle       (loading only) one of our bundles
Whole models (a bundle with the decode head; segvit-official import needs our config):
  segvit-official  SegViT (ATM head) and SegViT-Shrunk .pth of the mmseg 0.24 release
                   (zbwxp/SegVit), import and export, one table  (`segvit_official.py`)
  segformer-official  SegFormer .pth of the NVlabs release (mmseg 0.x)  (`segformer.py`)
  hf-segformer        transformers SegformerForSemanticSegmentation directory
                      (both: import and export; the model is inferred from the file,
                      --config optional)
  eomt-official  EoMT checkpoints of the authors' release (Lightning)        (`eomt.py`)
  hf-eomt        transformers EomtForUniversalSegmentation directory
                 (both: import and export; the model is inferred from the file; --config
                 optional, needed for non-standard widths of release files)
MiT backbones (`config.model_init` of a SegFormer, or of a SegViT with backbone.type='mit'):
  model_init_format "segformer-official" (an ImageNet mit_bX.pth or a whole release file),
  "hf-segformer" (SegformerModel / ...ForImageClassification / ...ForSemanticSegmentation
  directories), or "bundle"; the encoder is merged strictly into params["backbone"].
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from segvit_jax import bundle as bundle_lib
from segvit_jax.convert import augreg, dinov2, eomt, hf, mapping, segformer, segvit_official, \
    timm
from segvit_jax.convert.mapping import Converted
from segvit_jax.models import vit

LOADERS: dict[str, Callable[..., Converted]] = {
    "augreg-npz": augreg.load,
    "timm": timm.load,
    "dinov2": dinov2.load,
    "hf-vit": hf.load_vit,
    "hf-dinov2": hf.load_dinov2,
}
FORMATS = tuple(LOADERS)
# Whole-model layouts: read with `--from` (+ `--config`: required for CONFIG_REQUIRED, optional
# for the SegFormer and EoMT layouts, which record their model), written with `--to`.
MODEL_FORMATS = (segvit_official.FORMAT, *segformer.FORMATS, *eomt.FORMATS)
EXPORT_FORMATS = (segvit_official.FORMAT, *segformer.FORMATS, *eomt.FORMATS)
# Formats whose import needs our config of the model (the file does not record it all).
CONFIG_REQUIRED = (segvit_official.FORMAT,)
# Backbone formats of MiT models (`init_params`); each also reads its whole-model files.
MIT_FORMATS = segformer.FORMATS


def convert_model(src: str, out: str, fmt: str, config: Any = None, *,
                  trust_pickle: bool = False) -> str:
  """A whole-model checkpoint of format `fmt` (MODEL_FORMATS) -> a bundle at `out`; `config`
  (a ConfigDict or 'configs/X.py[:ARG]') describes the model (optional for SegFormer and
  EoMT)."""
  if fmt not in MODEL_FORMATS:
    raise ValueError(f"unknown whole-model format {fmt!r}; known: {', '.join(MODEL_FORMATS)}")
  if not os.path.exists(src):
    raise FileNotFoundError(f"{src} does not exist (format {fmt!r})")
  if fmt in segformer.FORMATS:
    return segformer.convert(src, out, fmt, config, trust_pickle=trust_pickle)
  if fmt in eomt.FORMATS:
    return eomt.convert(src, out, fmt, config, trust_pickle=trust_pickle)
  if config is None:
    raise ValueError(f"--from {fmt} needs our config of the model (--config configs/X.py)")
  return segvit_official.convert(src, out, config, trust_pickle=trust_pickle)


def export(bundle_path: str, out: str, fmt: str) -> str:
  """A whole-model bundle -> a checkpoint of format `fmt` (EXPORT_FORMATS) at `out`."""
  if fmt in segformer.FORMATS:
    segformer.export(bundle_path, out, fmt)
  elif fmt in eomt.FORMATS:
    eomt.export(bundle_path, out, fmt)
  elif fmt == segvit_official.FORMAT:
    segvit_official.export(bundle_path, out)
  else:
    raise ValueError(f"unknown export format {fmt!r}; known: {', '.join(EXPORT_FORMATS)}")
  return os.path.abspath(out)


def _flatten(tree) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _unflatten(flat: Mapping[str, Any]):
  return flax.traverse_util.unflatten_dict(dict(flat), sep="/")


def backbone_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """Flat parameter shapes of our ViT for a backbone config."""
  model = vit.Model(**cfg)
  p, (gh, gw) = cfg["patch_size"], cfg["posemb_grid"]
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, gh * p, gw * p, 3))))
  # Shapes from the boxes directly: unboxing would apply sharding constraints under a mesh.
  return {k: getattr(v, "value", v).shape for k, v in _flatten(abstract["params"]).items()}


def load(path: str, fmt: str, *, num_heads: int | None = None, trust_pickle: bool = False,
         image_size: int | tuple[int, int] | None = None, patch_size: int | None = None,
         posemb_resize: str | None = None, patch_resize: str = "bicubic_antialias",
         mean: tuple[float, ...] | None = None,
         std: tuple[float, ...] | None = None) -> Converted:
  """Reads a backbone checkpoint of format `fmt`, checks it strictly against our ViT (a
  missing or mis-shaped tensor fails naming the keys) and optionally resamples it:
  `image_size` (H or (H, W)) sets the stored position grid (resized with `posemb_resize`,
  which also becomes the run-time method; default: the method of the source implementation),
  `patch_size` resamples the patch kernel (FlexiViT pseudo-inverse with `patch_resize`)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist (format {fmt!r})")
  if fmt == "bundle":
    conv = _load_backbone_bundle(path)
  elif fmt in LOADERS:
    conv = LOADERS[fmt](path, num_heads=num_heads, trust_pickle=trust_pickle)
  else:
    raise ValueError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}, bundle")
  check(conv.params, conv.backbone, source=path)
  grid = None
  if image_size is not None:
    size = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
    patch = patch_size or conv.backbone["patch_size"]
    if size[0] % patch or size[1] % patch:
      raise ValueError(f"image size {size} is not divisible by the patch size {patch}")
    grid = (size[0] // patch, size[1] // patch)
  if posemb_resize:
    conv.backbone["posemb_resize"] = posemb_resize
  conv.params, conv.backbone = mapping.resample(
      conv.params, conv.backbone, grid=grid, patch=patch_size, patch_resize=patch_resize)
  if mean is not None:
    conv.mean = tuple(mean)
  if std is not None:
    conv.std = tuple(std)
  return conv


def check(params: Mapping[str, np.ndarray], cfg: Mapping[str, Any], *, source: str) -> None:
  """Strict comparison with the ViT `cfg` describes (bundle.merge_params' error format)."""
  shapes = backbone_shapes(cfg)
  bundle_lib.merge_params(_unflatten({k: jax.ShapeDtypeStruct(s, jnp.float32)
                                      for k, s in shapes.items()}),
                          _unflatten(params), source=source)


def _load_backbone_bundle(path: str) -> Converted:
  meta = bundle_lib.read_config(path)
  if meta["model"].get("name") != "vit":
    raise ValueError(f"{path} is a {meta['model'].get('name')!r} bundle, not a backbone "
                     "('vit') bundle")
  params = _flatten(bundle_lib.load_params(path))
  cfg = dict(meta["model"]["backbone"])
  cfg["posemb_grid"] = tuple(cfg["posemb_grid"])
  return Converted(params, cfg, tuple(meta["mean"]), tuple(meta["std"]))


def convert(src: str, out: str, fmt: str, **options) -> str:
  """Converts `src` (format `fmt`) into a backbone bundle at `out`; see `load` for options."""
  conv = load(src, fmt, **options)
  return bundle_lib.save_bundle(
      out, _unflatten(conv.params), {"name": "vit", "backbone": conv.backbone}, mean=conv.mean,
      std=conv.std, class_names=[], source=os.path.abspath(src), source_format=fmt,
      options={k: v for k, v in options.items() if v is not None and k != "trust_pickle"})


def require_init(path: str) -> None:
  """Fails early, naming the path, when `config.model_init` does not exist."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"model_init {os.path.abspath(path)} does not exist. Download the checkpoint (README, "
        "'Pretrained weights') or pass --config.model_init='' to train from scratch.")


def init_params(params: Any, model_cfg: Mapping[str, Any], path: str, fmt: str = "bundle", *,
                posemb_resize: str | None = None, patch_resize: str = "bicubic_antialias",
                mean: Any = None, std: Any = None) -> Any:
  """`params` (a segmentor's freshly initialised parameters) with pretrained weights merged
  in strictly: a bundle of the same model replaces everything; a backbone (a backbone bundle
  or any of FORMATS) replaces `params["backbone"]` after resizing the position grid (with
  `posemb_resize`, default the model's own run-time method) and the patch kernel to the
  model's, and dropping a final norm the model does not have. Models with an MiT backbone
  (SegFormer, SegViT with backbone.type='mit') take MIT_FORMATS instead (`_init_mit`). With
  the config's `mean` / `std`, warns when the weights were trained with other pixel
  statistics."""
  require_init(path)
  if is_mit(model_cfg):
    return _init_mit(params, model_cfg, path, fmt, mean=mean, std=std)
  if fmt in MIT_FORMATS:
    raise ValueError(f"model_init {path} ({fmt}) holds MiT (SegFormer) weights; this model's "
                     "backbone is a ViT")
  if fmt == "bundle" and bundle_lib.read_config(path)["model"].get("name") != "vit":
    return bundle_lib.merge_params(params, bundle_lib.load_params(path), source=path)
  bb = dict(model_cfg["backbone"])
  target = {**(vit.decode_variant(bb["variant"]) if bb.get("variant") else {}), **bb}
  # Layouts without a head count take the model's (it does not change the parameters).
  conv = load(path, fmt, num_heads=target["num_heads"])
  conv.params, conv.backbone = mapping.resample(
      conv.params, conv.backbone, grid=tuple(target["posemb_grid"]),
      patch=target["patch_size"], patch_resize=patch_resize,
      posemb_resize=posemb_resize or target.get("posemb_resize", "bicubic"))
  for name, want, got in (("mean", conv.mean, mean), ("std", conv.std, std)):
    if got is not None and not np.allclose(want, got, atol=1e-3):
      logging.warning("model_init %s expects pixel %s %s but the config uses %s", path, name,
                      tuple(want), tuple(got))
  flat_init = _flatten(params["backbone"])
  if "encoder_norm/scale" not in flat_init:  # SegViT's backbone has no final norm
    conv.params = {k: v for k, v in conv.params.items() if not k.startswith("encoder_norm/")}
  merged = bundle_lib.merge_params(params["backbone"], _unflatten(conv.params),
                                   source=f"{path} ({fmt})")
  return {**params, "backbone": merged}


def is_mit(model_cfg: Mapping[str, Any]) -> bool:
  """Whether a model config's backbone is an MiT (SegFormer, or SegViT on MiT)."""
  return model_cfg.get("name") == "segformer" or model_cfg["backbone"].get("type") == "mit"


def _init_mit(params: Any, model_cfg: Mapping[str, Any], path: str, fmt: str, *, mean: Any,
              std: Any) -> Any:
  """`init_params` for MiT backbones. A bundle of the same model (every parameter present
  with its shape) replaces everything; the MiT of any other source (a bundle of another MiT
  model, e.g. a SegFormer of other classes; a mit_bX.pth; an HF encoder or whole-model
  directory; a whole release file) is merged strictly into `params["backbone"]`, and the head
  keeps its fresh initialisation. Warns when the source's LayerNorm eps or pixel statistics
  differ from the model's."""
  if fmt == "bundle":
    meta = bundle_lib.read_config(path)
    loaded = bundle_lib.load_params(path)
    shapes = lambda tree: {k: np.shape(v) for k, v in _flatten(tree).items()}  # noqa: E731
    if shapes(loaded) == shapes(params):
      return bundle_lib.merge_params(params, loaded, source=path)
    if not is_mit(meta["model"]):
      raise ValueError(f"model_init {path} is a {meta['model'].get('name')!r} bundle with a ViT "
                       "backbone; this model's backbone is an MiT")
    conv = Converted(_flatten(loaded["backbone"]),
                     segformer.resolved_backbone(meta["model"]["backbone"]),
                     tuple(meta["mean"]), tuple(meta["std"]))
  elif fmt in MIT_FORMATS:
    conv = segformer.load_backbone(path, fmt)
  else:
    raise ValueError(f"model_init_format {fmt!r} reads ViT weights; an MiT backbone starts from "
                     f"{', '.join(MIT_FORMATS)} or a bundle")
  want_eps = segformer.resolved_backbone(model_cfg["backbone"])["norm_eps"]
  if conv.backbone["norm_eps"] != want_eps:
    logging.warning("model_init %s was trained with LayerNorm eps %s; the model uses %s", path,
                    conv.backbone["norm_eps"], want_eps)
  for name, want, got in (("mean", conv.mean, mean), ("std", conv.std, std)):
    if got is not None and not np.allclose(want, got, atol=1e-3):
      logging.warning("model_init %s expects pixel %s %s but the config uses %s", path, name,
                      tuple(want), tuple(got))
  merged = bundle_lib.merge_params(params["backbone"], _unflatten(conv.params),
                                   source=f"{path} ({fmt})")
  return {**params, "backbone": merged}
