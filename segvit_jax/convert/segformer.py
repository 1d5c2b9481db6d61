"""Whole SegFormer models (MiT encoder + all-MLP decoder, `models.segformer.SegFormer`) in the
layouts of the authors' release and of HuggingFace transformers, both ways; and their MiT
encoders as backbones for `config.model_init` (the release's `mix_transformer.py` and
`segformer_head.py` (NVlabs/SegFormer); transformers' `modeling_segformer.py`):

  python -m segvit_jax.convert SRC OUT --from segformer-official|hf-segformer [--config X.py]
  python -m segvit_jax.convert BUNDLE OUT --to segformer-official|hf-segformer

Formats (one `KeyRule` table each, shared by import and export, as `segvit_official.py`):
  segformer-official  the NVlabs release (mmseg 0.x) `.pth`: whole models `backbone.*` +
      `decode_head.*`, usually wrapped in `state_dict` beside `meta` (CLASSES, PALETTE) and
      `optimizer` (skipped); the key and value projections packed in `attn.kv` (2C, C: key rows
      first). Dropped on import: mmseg's unused `decode_head.conv_seg` (written back on export
      as zeros of the release's shape, so that load_state_dict(strict=True) accepts the file)
      and the BatchNorm's `num_batches_tracked` (kept in the bundle's config.json, written
      back on export).
      Also the ImageNet encoders `mit_bX.pth` (the backbone keys without `backbone.`, plus the
      1000-class `head.*`, dropped): backbones only, for `config.model_init` with
      `model_init_format="segformer-official"`; the file's kind is told by its keys.
  hf-segformer  a `save_pretrained` directory of SegformerForSemanticSegmentation
      (config.json + model.safetensors, sharded, or pytorch_model.bin; stages 0-based).
      `SegformerModel` and `SegformerForImageClassification` directories (transformers' MiT
      encoders `nvidia/mit-bX`) are backbones for `config.model_init`
      (`model_init_format="hf-segformer"`), as are whole-model files of both layouts.

Import infers the model from the file: stage widths, depths, patch sizes, key / value reduction
ratios, Mix-FFN ratio, decoder width and classes from the tensor shapes; HF's config.json adds
heads, strides, drop path and dropout; the official file does not record heads or strides
(the release's (1, 2, 5, 8) and (4, 2, 2, 2) are assumed; a `--config` says otherwise).
`--config configs/X.py[:ARG]` (optional) gives class names, mean and std, the test protocol
the bundle records (its `eval` section; without --config none) and our model config, which
must agree with the file (fields it records; shapes strictly). Class names otherwise come
from HF's id2label or the release's meta CLASSES; pixel statistics from HF's
preprocessor_config.json, else ImageNet's.

LayerNorm eps. The release builds its block norms and the norms closing the stages with eps
1e-6; transformers builds every SegFormer LayerNorm with torch's default 1e-5 (its config's
`layer_norm_eps` is read nowhere). The weights do not record it: import records the eps of the
layout's runtime in the bundle (`backbone.norm_eps`: official 1e-6, HF 1e-5; the
patch-embedding and key / value reduction norms use 1e-5 in both), so a converted bundle
reproduces the model as its source's code runs it. Export writes the weights as they are and
cannot carry the eps: the target's runtime applies its own. A bundle imported from the release
(1e-6) and exported to HF runs in transformers at 1e-5, one from HF exported to the release runs
in mmseg at 1e-6, and their logits differ from the bundle's by that change alone: max abs
8.7e-6 (B0) and 9.4e-6 (B2 widths) at 512 x 512, logits up to 3.6, random weights, float64
(tests/convert/test_segformer.py). The eps counts against each token's variance over channels,
so trained weights with low-variance tokens can differ more. Re-importing an export restores
the layout's eps: a round trip through the other layout changes `norm_eps` in the model config
and nothing else (parameters and BatchNorm statistics are bitwise equal). Export warns when
the bundle's eps is not the target's.

BatchNorm: torch weight / bias are flax `scale` / `bias` (params), running_mean / running_var
the bundle's `batch_stats` (`state/`): `batch_stats/head/batch_norm/{mean,var}`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np
from absl import logging

from segvit_jax import bundle as bundle_lib
from segvit_jax.convert.backbone import IMAGENET_MEAN_STD, Converted
from segvit_jax.convert.rules import QKV, Flat, KeyRule, attention, batch_norm, conv, flatten, \
    hf_class_names, hf_mean_std, hf_unsupported, key_list, linear, mlp, norm, packed_linear, \
    read_hf_model_dir, read_torch_checkpoint, strip_prefix, to_ours, to_theirs, unflatten, \
    write_hf_dir, write_torch_checkpoint
from segvit_jax.convert.whole_model import abstract_variables, class_names, labels, \
    load_config, palette, with_recorded
from segvit_jax.models import mit

OFFICIAL = "segformer-official"
HF = "hf-segformer"
FORMATS = (OFFICIAL, HF)
# The eps of the block and stage-closing LayerNorms each layout's runtime uses (docstring).
NORM_EPS = {OFFICIAL: 1e-6, HF: 1e-5}
EMBED_NORM_EPS = 1e-5
# What the release's MixVisionTransformer fixes and its files do not record (mit_b0..b5).
RELEASE_UNRECORDED = dict(num_heads=(1, 2, 5, 8), strides=(4, 2, 2, 2))
DEFAULT_DROPOUT, DEFAULT_DROP_PATH = 0.1, 0.1
# mmseg's BaseDecodeHead classifier, Conv2d(channels, num_classes, 1): SegFormerHead keeps it
# but predicts with `linear_pred`, so the release's models (and files) hold it unused; channels
# is 128 in every release config (local_configs/segformer/B0-B5).
CONV_SEG, RELEASE_HEAD_CHANNELS = "decode_head.conv_seg", 128


# ----------------------------------------------------------------------------------------------
# The tables. Our side: flat variable paths with the collection first ("params/backbone/...",
# "batch_stats/head/..."); `{s}` is our stage (1-based, as the release), `{j}` the block in it.

def official_encoder_rules(key: str, ours: str) -> tuple[KeyRule, ...]:
  """The release's MixVisionTransformer under key prefix `key` <-> our MiT under `ours`; the
  key and value projections packed in `attn.kv` (2C, C), key rows first."""
  b, o = key + "block{s}.{j}.", ours + "block_{s}_{j}/"
  return (*conv(key + "patch_embed{s}.proj", ours + "patch_embed_{s}/proj"),
          *norm(key + "patch_embed{s}.norm", ours + "patch_embed_{s}/norm"),
          *norm(b + "norm1", o + "norm1"),
          *linear(b + "attn.q", o + "attn/query"),
          *packed_linear(b + "attn.kv", [o + "attn/key", o + "attn/value"]),
          *conv(b + "attn.sr", o + "sr"),
          *norm(b + "attn.norm", o + "sr_norm"),
          *linear(b + "attn.proj", o + "attn/out"),
          *norm(b + "norm2", o + "norm2"),
          *mlp(b + "mlp.", o + "mlp"),
          *conv(b + "mlp.dwconv.dwconv", o + "mlp/dwconv"),
          *norm(key + "norm{s}", ours + "norm_{s}"))


def hf_encoder_rules(key: str, ours: str) -> tuple[KeyRule, ...]:
  """transformers' SegformerEncoder under `key` <-> our MiT under `ours` (stages 0-based
  there: `{s-1}`)."""
  b, o = key + "block.{s-1}.{j}.", ours + "block_{s}_{j}/"
  return (*conv(key + "patch_embeddings.{s-1}.proj", ours + "patch_embed_{s}/proj"),
          *norm(key + "patch_embeddings.{s-1}.layer_norm", ours + "patch_embed_{s}/norm"),
          *norm(b + "layer_norm_1", o + "norm1"),
          *attention(b + "attention.", o + "attn",
                     (*(f"self.{x}" for x in QKV), "output.dense")),
          *conv(b + "attention.self.sr", o + "sr"),
          *norm(b + "attention.self.layer_norm", o + "sr_norm"),
          *norm(b + "layer_norm_2", o + "norm2"),
          *mlp(b + "mlp.", o + "mlp", ("dense1", "dense2")),
          *conv(b + "mlp.dwconv.dwconv", o + "mlp/dwconv"),
          *norm(key + "layer_norm.{s-1}", ours + "norm_{s}"))


RULES = {
    OFFICIAL: official_encoder_rules("backbone.", "params/backbone/") + (
        *linear("decode_head.linear_c{s}.proj", "params/head/linear_c_{s}"),
        *conv("decode_head.linear_fuse.conv", "params/head/linear_fuse", bias=False),
        *batch_norm("decode_head.linear_fuse.bn", "params/head/batch_norm",
                    "batch_stats/head/batch_norm"),
        *conv("decode_head.linear_pred", "params/head/classifier"),
    ),
    HF: hf_encoder_rules("segformer.encoder.", "params/backbone/") + (
        *linear("decode_head.linear_c.{s-1}.proj", "params/head/linear_c_{s}"),
        *conv("decode_head.linear_fuse", "params/head/linear_fuse", bias=False),
        *batch_norm("decode_head.batch_norm", "params/head/batch_norm",
                    "batch_stats/head/batch_norm"),
        *conv("decode_head.classifier", "params/head/classifier"),
    ),
}
# The BatchNorm's step counter: an int64 the tables do not carry (`load`, `_export_state`).
NUM_BATCHES_TRACKED = {OFFICIAL: "decode_head.linear_fuse.bn.num_batches_tracked",
                       HF: "decode_head.batch_norm.num_batches_tracked"}
DROPPED = {  # file tensors that are not model weights (regexes, full match)
    OFFICIAL: (re.escape(CONV_SEG) + r"\..*",  # mmseg's classifier, unused by SegFormerHead
               r".*\.num_batches_tracked"),
    HF: (r".*\.num_batches_tracked",),
}
# Encoders alone (model_init), keys normalised by `_encoder_tensors`: ours without "backbone/".
ENCODER_RULES = {OFFICIAL: official_encoder_rules("", ""), HF: hf_encoder_rules("encoder.", "")}


# ----------------------------------------------------------------------------------------------
# Reading files

def _official_kind(tensors: Mapping[str, Any], source: str) -> str:
  """"model" (backbone.* + decode_head.*) or "encoder" (a mit_bX.pth); anything else fails
  naming keys."""
  keys = list(tensors)
  if "backbone.patch_embed1.proj.weight" in tensors:
    return "model" if any(k.startswith("decode_head.") for k in keys) else "backbone_only"
  if "patch_embed1.proj.weight" in tensors:
    return "encoder"
  hint = ""
  if any(k.startswith("backbone.layers.") for k in keys):
    hint = " (an mmseg ViT backbone: a SegViT checkpoint is --from segvit-official)"
  raise ValueError(f"{source} is not a SegFormer / MiT checkpoint of the official release: no "
                   f"backbone.patch_embed1.proj.weight (whole model) or patch_embed1.proj.weight "
                   f"(mit_bX.pth encoder){hint}. It has {len(keys)} tensor(s), e.g. "
                   f"{key_list(keys, 8)}")


def _read_hf(path: str, trust_pickle: bool) -> tuple[dict, dict[str, np.ndarray]]:
  config, tensors = read_hf_model_dir(path, "segformer", fmt=HF, name="SegFormer",
                                      trust_pickle=trust_pickle)
  bad = hf_unsupported(config)
  if bad:
    raise ValueError(f"{path}/config.json: {bad}; our MiT has exact GELU and RGB input")
  return config, tensors


# ----------------------------------------------------------------------------------------------
# The model a file holds

def _mit_fields() -> dict[str, Any]:
  return {f.name: f.default for f in dataclasses.fields(mit.MiT)
          if f.default is not dataclasses.MISSING and f.name not in ("dtype", "name", "parent")}


def resolved_backbone(bb: Mapping[str, Any]) -> dict[str, Any]:
  """Every MiT field a backbone config means: class defaults < the variant's sizes < explicit
  fields; sequences as tuples."""
  fields = _mit_fields()
  if bb.get("variant"):
    fields.update(mit.decode_variant(bb["variant"]))
  fields.update({k: v for k, v in bb.items() if k not in ("variant", "type")})
  return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in fields.items()}


def variant_name(dims: Sequence[int], depths: Sequence[int]) -> str | None:
  return next((n for n, (d, k) in mit.VARIANTS.items()
               if tuple(d) == tuple(dims) and tuple(k) == tuple(depths)), None)


def infer_backbone(flat: Mapping[str, np.ndarray], *, source: str, prefix: str = "") -> dict:
  """MiT sizes from converted parameter shapes (`prefix` + "patch_embed_1/proj/kernel", ...):
  dims, depths, patch sizes, key / value reduction ratios and the Mix-FFN ratio. Missing
  tensors are left to the strict check (which names them)."""
  stages = 0
  while f"{prefix}patch_embed_{stages + 1}/proj/kernel" in flat:
    stages += 1
  if not stages:
    raise ValueError(f"{source}: no MiT patch embedding (patch_embed_1) found")
  dims, depths, patches, srs, ratios = [], [], [], [], set()
  for s in range(1, stages + 1):
    kernel = flat[f"{prefix}patch_embed_{s}/proj/kernel"]  # (k, k, in, C)
    dims.append(int(kernel.shape[-1]))
    patches.append(int(kernel.shape[0]))
    depths.append(len({m[1] for k in flat
                       if (m := re.match(rf"{re.escape(prefix)}block_{s}_(\d+)/", k))}))
    sr = flat.get(f"{prefix}block_{s}_0/sr/kernel")
    srs.append(int(sr.shape[0]) if sr is not None else 1)
    for k, v in flat.items():
      if re.fullmatch(rf"{re.escape(prefix)}block_{s}_\d+/mlp/fc1/kernel", k):
        ratios.add(v.shape[1] / dims[-1])
  if len(ratios) > 1 or any(r != int(r) for r in ratios):
    raise ValueError(f"{source}: Mix-FFN hidden widths / stage widths {sorted(ratios)}: our "
                     "MiT has one integer mlp_ratio for all stages")
  return dict(dims=tuple(dims), depths=tuple(depths), patch_sizes=tuple(patches),
              sr_ratios=tuple(srs), mlp_ratio=int(ratios.pop()) if ratios else 4)


def _hf_backbone(config: Mapping[str, Any], source: str) -> dict[str, Any]:
  """The MiT fields config.json records."""
  ratios = set(config.get("mlp_ratios", [4]))
  if len(ratios) != 1:
    raise ValueError(f"{source}/config.json: mlp_ratios {config['mlp_ratios']}; our MiT has "
                     "one mlp_ratio for all stages")
  return dict(dims=tuple(config["hidden_sizes"]), depths=tuple(config["depths"]),
              num_heads=tuple(config["num_attention_heads"]),
              sr_ratios=tuple(config["sr_ratios"]), patch_sizes=tuple(config["patch_sizes"]),
              strides=tuple(config["strides"]), mlp_ratio=int(ratios.pop()),
              drop_path=float(config.get("drop_path_rate", DEFAULT_DROP_PATH)))


def _inferred_model(flat: Flat, fmt: str, hf_config: Mapping[str, Any] | None,
                    source: str) -> dict[str, Any]:
  """Our model config of a whole-model file."""
  bb = {**_mit_fields(), **RELEASE_UNRECORDED, "drop_path": DEFAULT_DROP_PATH,
        **infer_backbone(flat, source=source, prefix="params/backbone/")}
  dropout = DEFAULT_DROPOUT
  if hf_config is not None:
    bb.update(_hf_backbone(hf_config, source))
    dropout = float(hf_config.get("classifier_dropout_prob", DEFAULT_DROPOUT))
  bb.update(norm_eps=NORM_EPS[fmt], embed_norm_eps=EMBED_NORM_EPS)
  n = len(bb["dims"])
  for k in ("num_heads", "strides", "sr_ratios", "patch_sizes"):
    bb[k] = tuple(bb[k])[:n]
  variant = variant_name(bb["dims"], bb["depths"])
  order = ("dims", "depths", "num_heads", "sr_ratios", "patch_sizes", "strides", "mlp_ratio",
           "norm_eps", "embed_norm_eps", "drop_path")
  bb = {k: bb[k] for k in order}
  classifier = flat.get("params/head/classifier/kernel")
  fuse = flat.get("params/head/linear_fuse/kernel")
  if classifier is None or fuse is None:
    raise ValueError(f"{source}: no decode head classifier / linear_fuse: not a whole SegFormer")
  return {"name": "segformer", "num_classes": int(classifier.shape[-1]),
          "backbone": {**({"variant": variant} if variant else {}), **bb},
          "head": {"width": int(fuse.shape[-1]), "dropout": dropout}}


def _check_config(model_cfg: Mapping[str, Any], inferred: Mapping[str, Any], recorded: set[str],
                  source: str) -> None:
  """`--config`'s model against what the file records; differences named."""
  if model_cfg.get("name") != "segformer":
    raise ValueError(f"the config describes a {model_cfg.get('name')!r} model; SegFormer "
                     "checkpoints are model.name='segformer' models")
  want, got = resolved_backbone(model_cfg["backbone"]), inferred["backbone"]
  bad = [f"backbone.{k}: config {want[k]}, file {got[k]}" for k in sorted(recorded)
         if tuple(np.atleast_1d(want[k])) != tuple(np.atleast_1d(got[k]))]
  if model_cfg["num_classes"] != inferred["num_classes"]:
    bad.append(f"num_classes: config {model_cfg['num_classes']}, file {inferred['num_classes']}")
  if model_cfg["head"]["width"] != inferred["head"]["width"]:
    bad.append(f"head.width: config {model_cfg['head']['width']}, file "
               f"{inferred['head']['width']}")
  if bad:
    raise ValueError(f"{source} does not hold the model the config describes: "
                     + "; ".join(bad))


def check_variables(model_cfg: Mapping[str, Any], flat: Flat, *, source: str) -> dict:
  """Flat variables ("params/...", "batch_stats/...") -> {"params", "batch_stats"} trees,
  strictly checked against the model (missing / unexpected / mis-shaped keys named)."""
  abstract = abstract_variables(model_cfg)
  tree = unflatten(flat)
  return {c: bundle_lib.merge_params(abstract[c], tree.get(c, {}), source=f"{source} ({c})")
          for c in abstract}


@dataclasses.dataclass
class SegFormerCheckpoint:
  """A whole SegFormer read from a foreign file: variables {"params", "batch_stats"}, our model
  config, pixel statistics (0-255) and class names."""

  variables: dict
  model: dict
  mean: tuple[float, ...]
  std: tuple[float, ...]
  class_names: tuple[str, ...]
  num_batches_tracked: int | None = None


def load(path: str, fmt: str, config: ml_collections.ConfigDict | str | None = None, *,
         trust_pickle: bool = False) -> SegFormerCheckpoint:
  """Reads a whole SegFormer of layout `fmt` (FORMATS), checked strictly against the model it
  holds (with `config`: the config's model, which must agree with the file)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist (format {fmt!r})")
  hf_config, meta = None, {}
  if fmt == OFFICIAL:
    tensors, meta = read_torch_checkpoint(path, trust_pickle=trust_pickle)
    kind = _official_kind(tensors, path)
    if kind != "model":
      what = ("an ImageNet MiT encoder (mit_bX.pth: no backbone. prefix)" if kind == "encoder"
              else "an MiT backbone without decode_head.* tensors")
      raise ValueError(f"{path} holds {what}, not a whole SegFormer: use it as a backbone, "
                       f"config.model_init='{path}' with config.model_init_format='{OFFICIAL}'")
  elif fmt == HF:
    hf_config, tensors = _read_hf(path, trust_pickle)
    if not any(k.startswith("decode_head.") for k in tensors):
      raise ValueError(f"{path} holds a SegFormer encoder without decode_head.* (e.g. "
                       "SegformerModel, SegformerForImageClassification), not a whole "
                       f"SegformerForSemanticSegmentation: use it as config.model_init "
                       f"(config.model_init_format='{HF}')")
  else:
    raise ValueError(f"unknown SegFormer format {fmt!r}; known: {', '.join(FORMATS)}")
  flat = to_ours(tensors, RULES[fmt], source=path, layout=fmt, dropped=DROPPED[fmt])
  counter = tensors.get(NUM_BATCHES_TRACKED[fmt])
  inferred = _inferred_model(flat, fmt, hf_config, path)
  model_cfg = inferred
  if config is not None:
    config = load_config(config)
    model_cfg = config.model.to_dict()
    recorded = {"dims", "depths", "patch_sizes", "sr_ratios", "mlp_ratio"}
    if fmt == HF:
      recorded |= {"num_heads", "strides"}
    _check_config(model_cfg, inferred, recorded, path)
    bb = model_cfg["backbone"]
    if bb.get("norm_eps", NORM_EPS[fmt]) != NORM_EPS[fmt]:
      logging.warning("%s: the config says backbone.norm_eps=%s; the bundle records %s, the "
                      "eps the %s weights are run with", path, bb["norm_eps"], NORM_EPS[fmt], fmt)
    bb.update(norm_eps=NORM_EPS[fmt], embed_norm_eps=EMBED_NORM_EPS)
  variables = check_variables(model_cfg, flat, source=path)

  k = model_cfg["num_classes"]
  names = None
  if config is not None:
    names = class_names(config)
  elif hf_config is not None:
    names = hf_class_names(hf_config, k)
  elif meta.get("CLASSES") is not None and len(meta["CLASSES"]) == k:
    names = tuple(str(n) for n in meta["CLASSES"])
  ours = meta.get("segvit_jax") if isinstance(meta.get("segvit_jax"), dict) else {}
  if config is not None:
    mean, std = tuple(config.mean), tuple(config.std)
  elif hf_config is not None:
    mean, std = hf_mean_std(path, IMAGENET_MEAN_STD)
  elif ours.get("mean") and ours.get("std"):  # a file we exported
    mean, std = tuple(ours["mean"]), tuple(ours["std"])
  else:
    mean, std = IMAGENET_MEAN_STD
  return SegFormerCheckpoint(
      variables, model_cfg, tuple(mean), tuple(std),
      names or tuple(f"class_{i}" for i in range(k)),
      None if counter is None else int(np.asarray(counter).item()))


def convert(src: str, out: str, fmt: str, config: ml_collections.ConfigDict | str | None = None,
            *, trust_pickle: bool = False) -> str:
  """A whole SegFormer file of layout `fmt` -> a bundle at `out` (BatchNorm statistics in its
  `state/`)."""
  config, extra = with_recorded(config)  # --config: the bundle records its spec and `eval`
  ckpt = load(src, fmt, config, trust_pickle=trust_pickle)
  if ckpt.num_batches_tracked is not None:
    extra["num_batches_tracked"] = ckpt.num_batches_tracked
  return bundle_lib.save_bundle(
      out, ckpt.variables["params"], ckpt.model, mean=ckpt.mean, std=ckpt.std,
      class_names=ckpt.class_names, model_state={"batch_stats": ckpt.variables["batch_stats"]},
      source=os.path.abspath(src), source_format=fmt, **extra)


# ----------------------------------------------------------------------------------------------
# Encoders for config.model_init

def _encoder_tensors(tensors: Mapping[str, np.ndarray], fmt: str, source: str) -> tuple[
    dict[str, np.ndarray], tuple[str, ...]]:
  """The encoder's tensors with keys as ENCODER_RULES expects them, and the patterns of the
  rest (heads) to drop."""
  if fmt == OFFICIAL:
    if _official_kind(tensors, source) == "encoder":
      return dict(tensors), (r"head\..*",)  # mit_bX.pth: the ImageNet classifier
    return strip_prefix(tensors, ["backbone."]), (r"decode_head\..*",)
  # SegformerModel: encoder.*; ...ForSemanticSegmentation / ...ForImageClassification:
  # segformer.encoder.* + decode_head.* / classifier.*
  return strip_prefix(tensors, ["segformer."]), (r"decode_head\..*", r"classifier\..*")


def load_backbone(path: str, fmt: str, *, trust_pickle: bool = False) -> Converted:
  """The MiT encoder of any file of layout `fmt` (mit_bX.pth, HF encoder or whole-model
  directories, whole release files): flat parameters in our MiT's names, its sizes and norm
  eps (`backbone`), and the pixel statistics it expects."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist (format {fmt!r})")
  mean, std = IMAGENET_MEAN_STD
  if fmt == OFFICIAL:
    tensors, _ = read_torch_checkpoint(path, trust_pickle=trust_pickle)
  elif fmt == HF:
    _, tensors = _read_hf(path, trust_pickle)
    mean, std = hf_mean_std(path, IMAGENET_MEAN_STD)
  else:
    raise ValueError(f"unknown SegFormer format {fmt!r}; known: {', '.join(FORMATS)}")
  tensors, heads = _encoder_tensors(tensors, fmt, path)
  flat = to_ours(tensors, ENCODER_RULES[fmt], source=path, layout=f"{fmt} MiT encoder",
                 dropped=DROPPED[fmt] + heads)
  cfg = {**infer_backbone(flat, source=path), "norm_eps": NORM_EPS[fmt],
         "embed_norm_eps": EMBED_NORM_EPS}
  return Converted(flat, cfg, tuple(mean), tuple(std))


# ----------------------------------------------------------------------------------------------
# Export

def _bundle_variables(bundle_path: str, fmt: str) -> tuple[dict, Flat]:
  meta = bundle_lib.read_config(bundle_path)
  name = meta.get("model", {}).get("name", "segvit")
  if name != "segformer":
    raise ValueError(f"{bundle_path} is a {name!r} bundle; --to {fmt} writes whole SegFormer "
                     "models (a bundle of model.name='segformer')")
  loaded = bundle_lib.load_bundle(bundle_path)  # strict check against its model
  flat = {k: np.asarray(v) for k, v in flatten(loaded.variables).items()}
  return meta, flat


def _export_state(bundle_path: str, fmt: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(bundle config, the layout's state dict as numpy, numerically sorted)."""
  meta, flat = _bundle_variables(bundle_path, fmt)
  state = to_theirs(flat, RULES[fmt], source=bundle_path, layout=fmt)
  state[NUM_BATCHES_TRACKED[fmt]] = np.asarray(meta.get("num_batches_tracked", 0), np.int64)
  bb = resolved_backbone(meta["model"]["backbone"])
  if bb["norm_eps"] != NORM_EPS[fmt] or bb["embed_norm_eps"] != EMBED_NORM_EPS:
    logging.warning(
        "%s runs its LayerNorms with eps %s (patch embedding / key-value reduction %s); the "
        "%s runtime uses %s (%s): written unchanged, its logits differ by that change alone "
        "(about 1e-5 for random weights; see segvit_jax/convert/segformer.py)", bundle_path,
        bb["norm_eps"], bb["embed_norm_eps"], fmt, NORM_EPS[fmt], EMBED_NORM_EPS)
  return meta, state


def export_official(bundle_path: str, out: str) -> dict[str, np.ndarray]:
  """A SegFormer bundle -> the release's .pth at `out`: torch.save of {"state_dict": tensors
  (every tensor of the release's model: the unused `conv_seg` as zeros), "meta": {CLASSES,
  PALETTE, segvit_jax: model config, pixel statistics, source}}, readable with
  torch.load(weights_only=True). Returns the state dict as numpy arrays."""
  meta, state = _export_state(bundle_path, OFFICIAL)
  k = meta["model"]["num_classes"]
  state[f"{CONV_SEG}.weight"] = np.zeros((k, RELEASE_HEAD_CHANNELS, 1, 1), np.float32)
  state[f"{CONV_SEG}.bias"] = np.zeros(k, np.float32)
  bb = resolved_backbone(meta["model"]["backbone"])
  n = len(bb["dims"])
  differ = {k: bb[k] for k, v in RELEASE_UNRECORDED.items() if tuple(bb[k]) != v[:n]}
  if differ:
    logging.warning("%s: the release's files do not record %s (its mit_bX models fix them to "
                    "%s); importing the export needs a --config that says so", bundle_path,
                    differ, {k: RELEASE_UNRECORDED[k][:n] for k in differ})
  names = labels(meta)
  info = {"model": meta["model"], "mean": list(meta.get("mean", [])),
          "std": list(meta.get("std", [])), "source": os.path.abspath(bundle_path)}
  write_torch_checkpoint(out, state, {"CLASSES": tuple(names), "PALETTE": palette(names),
                                      "segvit_jax": json.loads(json.dumps(info, default=list))})
  return state


def hf_config(meta: Mapping[str, Any]) -> dict[str, Any]:
  """config.json of SegformerForSemanticSegmentation for a SegFormer bundle's config."""
  model = meta["model"]
  bb = resolved_backbone(model["backbone"])
  n = len(bb["dims"])
  names = labels(meta)
  return {
      "architectures": ["SegformerForSemanticSegmentation"], "model_type": "segformer",
      "num_channels": 3, "num_encoder_blocks": n, "depths": list(bb["depths"]),
      "hidden_sizes": list(bb["dims"]), "num_attention_heads": list(bb["num_heads"]),
      "sr_ratios": list(bb["sr_ratios"]), "patch_sizes": list(bb["patch_sizes"]),
      "strides": list(bb["strides"]), "mlp_ratios": [bb["mlp_ratio"]] * n,
      "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
      "classifier_dropout_prob": float(model["head"].get("dropout", DEFAULT_DROPOUT)),
      "drop_path_rate": float(bb["drop_path"]), "initializer_range": 0.02,
      # Read nowhere by transformers (module docstring): the bundle's value, for the record.
      "layer_norm_eps": float(bb["norm_eps"]),
      "decoder_hidden_size": int(model["head"]["width"]), "reshape_last_stage": True,
      "semantic_loss_ignore_index": 255,
      "id2label": {str(i): n for i, n in enumerate(names)},
      "label2id": {n: i for i, n in enumerate(names)},
  }


def export_hf(bundle_path: str, out: str) -> dict[str, np.ndarray]:
  """A SegFormer bundle -> a directory SegformerForSemanticSegmentation.from_pretrained loads:
  config.json, model.safetensors (float32; the BatchNorm counter int64) and
  preprocessor_config.json (the bundle's mean / std, no resize). Returns the state dict."""
  meta, state = _export_state(bundle_path, HF)
  mean, std = meta.get("mean") or IMAGENET_MEAN_STD[0], meta.get("std") or IMAGENET_MEAN_STD[1]
  write_hf_dir(out, state, hf_config(meta), {
      "image_processor_type": "SegformerImageProcessor", "do_resize": False, "do_rescale": True,
      "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [m / 255 for m in mean],
      "image_std": [s / 255 for s in std], "do_reduce_labels": False})
  return state


def summary(model: Mapping[str, Any]) -> str:
  """One line for the CLI: 'SegFormer B0 dims (...) depths (...) head width 256 classes 19
  norm_eps 1e-06'."""
  bb = resolved_backbone(model["backbone"])
  name = model["backbone"].get("variant") or "MiT"
  return (f"SegFormer {name} dims {bb['dims']} depths {bb['depths']} head width "
          f"{model['head']['width']} classes {model['num_classes']} norm_eps {bb['norm_eps']}")

