"""Converters between the public forms of pretrained weights and ours: ViT backbones (AugReg,
timm, DINOv2, DINOv3, transformers) into backbone bundles or a segmentor's backbone
(`config.model_init`), and whole SegViT, SegFormer and EoMT models of the authors' releases and
of transformers into bundles and back. The command line is `__main__.py`:

  python -m segvit_jax.convert SRC OUT --from FORMAT [--config X.py] [flags]
  python -m segvit_jax.convert BUNDLE OUT --to FORMAT

`FORMAT_TABLE` below lists every format once: what it holds, how it is read and written,
whether import needs our config, and its line of help; FORMATS, MODEL_FORMATS,
EXPORT_FORMATS, CONFIG_REQUIRED and MIT_FORMATS (and the command line's choices) derive from
it. Each layout is one module, a `rules.KeyRule` table plus small transforms (`rules.py`):
`augreg.py`, `timm.py`, `dinov2.py`, `dinov3.py`, `hf.py` (ViT backbones, whose shared steps are in
`backbone.py`), `segvit_official.py`, `segformer.py`, `eomt.py` (whole models, both ways; what
they share in `whole_model.py`). "bundle" (loading only) is one of our bundles.

MiT backbones (`config.model_init` of a SegFormer, or of a SegViT with backbone.type='mit'):
model_init_format "segformer-official" (an ImageNet mit_bX.pth or a whole release file),
"hf-segformer" (SegformerModel / ...ForImageClassification / ...ForSemanticSegmentation
directories), or "bundle"; the encoder is merged strictly into params["backbone"].
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping

import numpy as np
from absl import logging

from segvit_jax import bundle as bundle_lib
from segvit_jax.convert import augreg, backbone, dinov2, dinov3, eomt, hf, segformer, \
    segvit_official, timm
from segvit_jax.convert.backbone import Converted
from segvit_jax.convert.rules import flatten, unflatten
from segvit_jax.models import vit

VIT_BACKBONE, WHOLE_MODEL = "ViT backbone", "whole model"


@dataclasses.dataclass(frozen=True)
class Format:
  """One checkpoint layout. `kind`: VIT_BACKBONE (`read(path, *, num_heads, trust_pickle)
  -> Converted`) or WHOLE_MODEL (`read(src, out, *, config, trust_pickle)` writes a bundle and
  returns its path; `config` says whether that needs our config of the model: "required",
  "optional" or "no"). `export(bundle, out)` writes a bundle in the layout; `mit(path, *,
  trust_pickle) -> Converted` reads the MiT encoder of the layout's files (`init_params`).
  `delta`: the layout has delta-weight files (the EoMT release's DINOv3 models): `read` takes
  `backbone=` (the DINOv3 ViT to add back) and `export` `delta_from=`."""

  kind: str
  read: Callable[..., Any]
  help: str
  export: Callable[..., Any] | None = None
  config: str = "no"
  mit: Callable[..., Converted] | None = None
  delta: bool = False


def _torch_models():
  """`segvit_jax.torch`, imported when used (it needs torch, an optional dependency)."""
  from segvit_jax import torch as torch_models  # pylint: disable=g-import-not-at-top
  return torch_models


def _read_torch_file(src: str, out: str, **options) -> str:
  return _torch_models().to_bundle(src, out, **options)


def _export_torch(bundle_path: str, out: str) -> str:
  return _torch_models().export(bundle_path, out)


FORMAT_TABLE: dict[str, Format] = {
    "augreg-npz": Format(VIT_BACKBONE, augreg.load,
                         "big_vision / vision_transformer .npz, every flavour"),
    "timm": Format(VIT_BACKBONE, timm.load, "timm .safetensors / .pth, AugReg and DINOv2 models"),
    "dinov2": Format(VIT_BACKBONE, dinov2.load,
                     "facebookresearch/dinov2 .pth, registers, SwiGLU, chunks"),
    "hf-vit": Format(VIT_BACKBONE, hf.load_vit,
                     "transformers ViTModel save_pretrained directory"),
    "hf-dinov2": Format(VIT_BACKBONE, hf.load_dinov2,
                        "transformers Dinov2Model / Dinov2WithRegistersModel directory"),
    "dinov3": Format(VIT_BACKBONE, dinov3.load,
                     "facebookresearch/dinov3 ViT .pth (RoPE, registers, SwiGLU, masked k bias)"),
    "hf-dinov3": Format(VIT_BACKBONE, dinov3.load_hf, "transformers DINOv3ViTModel directory"),
    segvit_official.FORMAT: Format(
        WHOLE_MODEL, segvit_official.convert,
        "SegViT (ATM head) and SegViT-Shrunk .pth of the mmseg 0.24 release (zbwxp/SegVit)",
        export=segvit_official.export, config="required"),
    segformer.OFFICIAL: Format(
        WHOLE_MODEL, functools.partial(segformer.convert, fmt=segformer.OFFICIAL),
        "SegFormer .pth of the NVlabs release (mmseg 0.x); its MiT encoders mit_bX.pth",
        export=segformer.export_official, config="optional",
        mit=functools.partial(segformer.load_backbone, fmt=segformer.OFFICIAL)),
    segformer.HF: Format(
        WHOLE_MODEL, functools.partial(segformer.convert, fmt=segformer.HF),
        "transformers SegformerForSemanticSegmentation directory; its encoders (nvidia/mit-bX)",
        export=segformer.export_hf, config="optional",
        mit=functools.partial(segformer.load_backbone, fmt=segformer.HF)),
    eomt.OFFICIAL: Format(
        WHOLE_MODEL, functools.partial(eomt.convert, fmt=eomt.OFFICIAL),
        "EoMT checkpoints of the authors' release (Lightning), on DINOv2 or DINOv3 (delta "
        "weights: --backbone)", export=eomt.export_official, config="optional", delta=True),
    eomt.HF: Format(
        WHOLE_MODEL, functools.partial(eomt.convert, fmt=eomt.HF),
        "transformers EomtForUniversalSegmentation directory",
        export=eomt.export_hf, config="optional"),
    eomt.HF_DINOV3: Format(
        WHOLE_MODEL, functools.partial(eomt.convert, fmt=eomt.HF_DINOV3),
        "transformers EomtDinov3ForUniversalSegmentation directory (EoMT on DINOv3)",
        export=functools.partial(eomt.export_hf, fmt=eomt.HF_DINOV3), config="optional"),
    "torch": Format(
        WHOLE_MODEL, _read_torch_file,
        "SegViT / SegViT-Shrunk for plain torch.nn modules (segvit_jax.torch.load)",
        export=_export_torch),
}
# ViT backbone layouts (`load`, `convert`, `config.model_init_format`).
FORMATS = tuple(n for n, f in FORMAT_TABLE.items() if f.kind == VIT_BACKBONE)
# Whole-model layouts: read with `--from` (+ `--config`: required for CONFIG_REQUIRED, optional
# for the others, which record their model), written with `--to`.
MODEL_FORMATS = tuple(n for n, f in FORMAT_TABLE.items() if f.kind == WHOLE_MODEL)
EXPORT_FORMATS = tuple(n for n, f in FORMAT_TABLE.items() if f.export is not None)
CONFIG_REQUIRED = tuple(n for n, f in FORMAT_TABLE.items() if f.config == "required")
# Backbone formats of MiT models (`init_params`); each also reads its whole-model files.
MIT_FORMATS = tuple(n for n, f in FORMAT_TABLE.items() if f.mit is not None)
# Whole-model layouts with delta-weight files (`--backbone` / `--delta_from`).
DELTA_FORMATS = tuple(n for n, f in FORMAT_TABLE.items() if f.delta)


def _delta_option(fmt: str, flag: str, value: str | None) -> dict[str, str]:
  """{name: value} for a layout with delta-weight files; a value for another layout fails."""
  if value is None:
    return {}
  if fmt not in DELTA_FORMATS:
    raise ValueError(f"--{flag} applies to the layouts with delta-weight files "
                     f"({', '.join(DELTA_FORMATS)}), not {fmt}")
  if not os.path.exists(value):
    raise FileNotFoundError(f"--{flag} {value} does not exist (a DINOv3 ViT: the "
                            "facebookresearch/dinov3 .pth, a DINOv3ViTModel directory or a "
                            "backbone bundle)")
  return {"backbone" if flag == "backbone" else "delta_from": value}


def convert_model(src: str, out: str, fmt: str, config: Any = None, *,
                  trust_pickle: bool = False, backbone: str | None = None) -> str:
  """A whole-model checkpoint of format `fmt` (MODEL_FORMATS) -> a bundle at `out`; `config`
  (a ConfigDict or 'configs/X.py[:ARG]') describes the model (optional for SegFormer and
  EoMT); `backbone` the DINOv3 ViT a delta-weight file (DELTA_FORMATS) is added to."""
  if fmt not in MODEL_FORMATS:
    raise ValueError(f"unknown whole-model format {fmt!r}; known: {', '.join(MODEL_FORMATS)}")
  if not os.path.exists(src):
    raise FileNotFoundError(f"{src} does not exist (format {fmt!r})")
  if config is None and fmt in CONFIG_REQUIRED:
    raise ValueError(f"--from {fmt} needs our config of the model (--config configs/X.py)")
  return FORMAT_TABLE[fmt].read(src, out, config=config, trust_pickle=trust_pickle,
                                **_delta_option(fmt, "backbone", backbone))


def export(bundle_path: str, out: str, fmt: str, delta_from: str | None = None) -> str:
  """A whole-model bundle -> a checkpoint of format `fmt` (EXPORT_FORMATS) at `out`;
  `delta_from` (DELTA_FORMATS): the delta weights against that DINOv3 ViT."""
  if fmt not in EXPORT_FORMATS:
    raise ValueError(f"unknown export format {fmt!r}; known: {', '.join(EXPORT_FORMATS)}")
  FORMAT_TABLE[fmt].export(bundle_path, out, **_delta_option(fmt, "delta_from", delta_from))
  return os.path.abspath(out)


def load(path: str, fmt: str, *, num_heads: int | None = None, trust_pickle: bool = False,
         image_size: int | tuple[int, int] | None = None, patch_size: int | None = None,
         posemb_resize: str | None = None, patch_resize: str = "bicubic_antialias",
         mean: tuple[float, ...] | None = None,
         std: tuple[float, ...] | None = None) -> Converted:
  """Reads a backbone checkpoint of format `fmt` (FORMATS, or "bundle"), checks it strictly
  against our ViT (a missing or mis-shaped tensor fails naming the keys) and optionally
  resamples it: `image_size` (H or (H, W)) sets the stored position grid (resized with
  `posemb_resize`, which also becomes the run-time method; default: the method of the source
  implementation), `patch_size` resamples the patch kernel (FlexiViT pseudo-inverse with
  `patch_resize`)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist (format {fmt!r})")
  if fmt == "bundle":
    conv = backbone.read_bundle(path)
  elif fmt in FORMATS:
    conv = FORMAT_TABLE[fmt].read(path, num_heads=num_heads, trust_pickle=trust_pickle)
  else:
    raise ValueError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}, bundle")
  backbone.check(conv.params, conv.backbone, source=path)
  grid = None
  if image_size is not None:
    size = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
    patch = patch_size or conv.backbone["patch_size"]
    if size[0] % patch or size[1] % patch:
      raise ValueError(f"image size {size} is not divisible by the patch size {patch}")
    grid = (size[0] // patch, size[1] // patch)
  if posemb_resize:
    conv.backbone["posemb_resize"] = posemb_resize
  conv.params, conv.backbone = backbone.resample(
      conv.params, conv.backbone, grid=grid, patch=patch_size, patch_resize=patch_resize)
  if mean is not None:
    conv.mean = tuple(mean)
  if std is not None:
    conv.std = tuple(std)
  return conv


def convert(src: str, out: str, fmt: str, **options) -> str:
  """Converts `src` (format `fmt`) into a backbone bundle at `out`; see `load` for options."""
  conv = load(src, fmt, **options)
  return bundle_lib.save_bundle(
      out, unflatten(conv.params), {"name": "vit", "backbone": conv.backbone}, mean=conv.mean,
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
  conv.params, conv.backbone = backbone.resample(
      conv.params, conv.backbone, grid=tuple(target["posemb_grid"]),
      patch=target["patch_size"], patch_resize=patch_resize,
      posemb_resize=posemb_resize or target.get("posemb_resize", "bicubic"))
  backbone.warn_pixel_stats(conv, path, mean, std)
  flat_init = flatten(params["backbone"])
  if "encoder_norm/scale" not in flat_init:  # SegViT's backbone has no final norm
    conv.params = {k: v for k, v in conv.params.items() if not k.startswith("encoder_norm/")}
  merged = bundle_lib.merge_params(params["backbone"], unflatten(conv.params),
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
    shapes = lambda tree: {k: np.shape(v) for k, v in flatten(tree).items()}  # noqa: E731
    if shapes(loaded) == shapes(params):
      return bundle_lib.merge_params(params, loaded, source=path)
    if not is_mit(meta["model"]):
      raise ValueError(f"model_init {path} is a {meta['model'].get('name')!r} bundle with a ViT "
                       "backbone; this model's backbone is an MiT")
    conv = Converted(flatten(loaded["backbone"]),
                     segformer.resolved_backbone(meta["model"]["backbone"]),
                     tuple(meta["mean"]), tuple(meta["std"]))
  elif fmt in MIT_FORMATS:
    conv = FORMAT_TABLE[fmt].mit(path)
  else:
    raise ValueError(f"model_init_format {fmt!r} reads ViT weights; an MiT backbone starts from "
                     f"{', '.join(MIT_FORMATS)} or a bundle")
  want_eps = segformer.resolved_backbone(model_cfg["backbone"])["norm_eps"]
  if conv.backbone["norm_eps"] != want_eps:
    logging.warning("model_init %s was trained with LayerNorm eps %s; the model uses %s", path,
                    conv.backbone["norm_eps"], want_eps)
  backbone.warn_pixel_stats(conv, path, mean, std)
  merged = bundle_lib.merge_params(params["backbone"], unflatten(conv.params),
                                   source=f"{path} ({fmt})")
  return {**params, "backbone": merged}
