"""Whole SegViT models in the layout of the authors' release (github zbwxp/SegVit,
mmsegmentation 0.24: `ATMHead`, `TPNATMHead`, `vit_shrink`), both ways:

  python -m segvit_jax.convert SRC.pth OUT --from segvit-official --config configs/X.py[:ARG]
  python -m segvit_jax.convert BUNDLE OUT.pth --to segvit-official

One `rules.KeyRule` table per head type serves both directions: each rule pairs a key
template of the release with one or more of our parameter paths (a tuple for a packed tensor),
the transform into our layout and its inverse. Templates name integer fields, `{i}` (block),
`{s}` (decoder stage), `{j}` (layer); `{s+1}` is field s plus one: the release numbers its
modules `input_proj_1`, `decoder_1`, ... from 1, in the order the head uses the features (ATM:
deepest first, as our `ATMHead`; Shrunk: shallowest first, as our `ShrunkHead`), so its stage
s + 1 is our stage s for both heads.

  backbone (mmseg VisionTransformer / vit_shrink): cls_token, pos_embed (1, 1 + N, D),
    patch_embed.projection, layers.{i}.{ln1, attn.attn (nn.MultiheadAttention: q/k/v packed
    in in_proj), ln2, ffn.layers.0.0 (fc1), ffn.layers.1 (fc2)}; no final norm
  ATM head (ATMHead): input_proj_{s+1}, proj_norm_{s+1}, decoder_{s+1}.layers.{j}.{self_attn
    (nn.MultiheadAttention), multihead_attn.{q, k, v, proj} (separate Linear), linear1/2,
    norm1/2/3}, q (nn.Embedding: the class tokens), class_embed
  Shrunk head (TPNATMHead): q (nn.Embedding: the QU queries, row-major over the crop grid),
    input_proj_{s+1}, proj_norm_{s+1}, decoder_{s+1}.layers.{j} (stock torch
    TransformerDecoderLayer: cross-attention packed in multihead_attn.in_proj), and the
    single-stage ATM head under `atm.` without input projection
  buffers: the ATM loss's class weights, `decode_head.loss_decode.criterion.empty_weight`
    (Shrunk: also `decode_head.atm.loss_decode.criterion.empty_weight`: TPNATMHead and its
    ATMSingleHead each build the loss). Written on export as the release's model holds them
    (ones, the no-object weight last: the bundle's `loss.no_object_weight` if its config.json
    records one, else the release's 0.1), so the file loads with load_state_dict(strict=True);
    on import they are optional and dropped (not parameters: mmseg rebuilds them from its config)
  dropped on import, not written on export: `conv_seg` (mmseg's unused classifier, deleted in
    the release); optimizer state and meta

The file does not record tap layers, `shrink_idx`, head counts or the dataset: import takes our
config (`--config`), whose `model` (and `dataset`, `mean`, `std`) describe the model, and checks
every converted tensor strictly against the model it builds; the bundle records the config's
test protocol (its `eval` section). The file sets the stored position grid (`posemb_grid`,
from pos_embed's 1 + g*g rows) and the Shrunk QU query grid (`query_grid`, from q's g*g rows);
nothing is resampled, so bundle -> export -> import is bitwise exact.
Run-time position-embedding resize: bicubic, as mmseg's ViT.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping

import ml_collections
import numpy as np
from absl import logging

from segvit_jax import bundle as bundle_lib
from segvit_jax.convert.backbone import is_square
from segvit_jax.convert.rules import KeyRule, attention, conv, flatten, key_list, linear, mlp, \
    norm, packed_attention, read_torch, to_ours, to_theirs, unflatten, write_torch_checkpoint
from segvit_jax.convert.whole_model import abstract_variables, class_names, class_weights, \
    load_config, no_object_weight, palette, with_recorded
from segvit_jax.models import shrunk, vit

FORMAT = "segvit-official"
HEAD_NAMES = {"atm": "ATM", "shrunk": "Shrunk"}


# ----------------------------------------------------------------------------------------------
# The table

def _decoder_layer(theirs: str, ours: str, *, packed_cross: bool) -> tuple[KeyRule, ...]:
  """A post-norm decoder layer: the ATM heads' (cross-attention as separate q, k, v, proj
  Linear layers) or stock torch TransformerDecoderLayer's (`packed_cross`, the QU decoders)."""
  if packed_cross:
    cross = packed_attention(f"{theirs}.multihead_attn", f"{ours}/cross_attn")
  else:
    cross = attention(f"{theirs}.multihead_attn.", f"{ours}/cross_attn", ("q", "k", "v", "proj"))
  return (*packed_attention(f"{theirs}.self_attn", f"{ours}/self_attn"), *cross,
          *mlp(f"{theirs}.", f"{ours}/mlp", ("linear1", "linear2")),
          *(r for n in (1, 2, 3) for r in norm(f"{theirs}.norm{n}", f"{ours}/norm{n}")))


def _atm_head(theirs: str, ours: str, *, input_proj: bool) -> tuple[KeyRule, ...]:
  """ATMHead (`input_proj`) or the Shrunk model's single-stage ATMSingleHead (Identity
  projections: no parameters)."""
  proj = ()
  if input_proj:
    proj = (*linear(theirs + "input_proj_{s+1}", ours + "input_proj_{s}"),
            *norm(theirs + "proj_norm_{s+1}", ours + "proj_norm_{s}"))
  return (KeyRule(theirs + "q.weight", ours + "class_tokens"),
          *linear(theirs + "class_embed", ours + "class_embed"), *proj,
          *_decoder_layer(theirs + "decoder_{s+1}.layers.{j}", ours + "decoder_{s}_layer_{j}",
                          packed_cross=False))


_BLOCK, _OUR_BLOCK = "backbone.layers.{i}", "backbone/encoderblock_{i}"
BACKBONE_RULES = (
    KeyRule("backbone.cls_token", "backbone/cls"),
    KeyRule("backbone.pos_embed", "backbone/pos_embedding"),
    *conv("backbone.patch_embed.projection", "backbone/embedding"),
    *norm(f"{_BLOCK}.ln1", f"{_OUR_BLOCK}/norm1"),
    *packed_attention(f"{_BLOCK}.attn.attn", f"{_OUR_BLOCK}/attn"),
    *norm(f"{_BLOCK}.ln2", f"{_OUR_BLOCK}/norm2"),
    *mlp(f"{_BLOCK}.ffn.layers.", f"{_OUR_BLOCK}/mlp", ("0.0", "1")),
)

RULES = {
    "atm": BACKBONE_RULES + _atm_head("decode_head.", "head/", input_proj=True),
    "shrunk": BACKBONE_RULES + (
        KeyRule("decode_head.q.weight", "head/queries"),
        *linear("decode_head.input_proj_{s+1}", "head/input_proj_{s}"),
        *norm("decode_head.proj_norm_{s+1}", "head/proj_norm_{s}"),
        *_decoder_layer("decode_head.decoder_{s+1}.layers.{j}", "head/decoder_{s}_layer_{j}",
                        packed_cross=True),
    ) + _atm_head("decode_head.atm.", "head/atm/", input_proj=False),
}

# The ATM loss's class-weight buffers of each head type: mmseg's BaseDecodeHead builds
# `loss_decode` (ATMLoss), whose `criterion` (SetCriterion) registers `empty_weight`; Shrunk's
# TPNATMHead and the ATMSingleHead under `atm.` each build one.
LOSS_BUFFERS = {
    "atm": ("decode_head.loss_decode.criterion.empty_weight",),
    "shrunk": ("decode_head.loss_decode.criterion.empty_weight",
               "decode_head.atm.loss_decode.criterion.empty_weight"),
}
# SetCriterion's default no-object weight (`eos_coef`; the release's configs keep it), the
# paper's 0.1 (SegViT Sec. 3.2, the ATM loss).
RELEASE_NO_OBJECT_WEIGHT = 0.1

# Release tensors that are not model weights (regexes, full match).
DROPPED = (
    r"decode_head\.(?:atm\.)?loss_decode\..*",  # ATMLoss's class weights (LOSS_BUFFERS)
    r"decode_head\.(?:atm\.)?conv_seg\..*",  # mmseg's classifier, unused (deleted in the release)
)


# ----------------------------------------------------------------------------------------------
# What a file holds

def head_type(tensors: Mapping[str, Any], source: str) -> str:
  """"atm" or "shrunk" from the keys; a file of another model fails, naming some of its keys."""
  keys = list(tensors)
  if any(k.startswith("decode_head.atm.") for k in keys):
    return "shrunk"
  if any(re.fullmatch(r"decode_head\.decoder_\d+\.layers\.\d+\.multihead_attn\.q\.weight", k)
         for k in keys):
    return "atm"
  has_backbone = any(k.startswith("backbone.layers.") for k in keys)
  hint = ("it has an mmseg ViT backbone (backbone.layers.*) but no SegViT decode head"
          if has_backbone else "no backbone.layers.* / decode_head.* tensors")
  backbone_hint = ("" if has_backbone else "; for a ViT backbone checkpoint use --from timm, "
                   "augreg-npz, dinov2, hf-vit or hf-dinov2")
  raise ValueError(f"{source} is not a SegViT checkpoint of the official release ({hint}: "
                   f"neither decode_head.decoder_*.layers.*.multihead_attn.q.weight (ATM head) "
                   f"nor decode_head.atm.* (Shrunk head)). It has {len(keys)} tensor(s), e.g. "
                   f"{key_list(keys, 8)}{backbone_hint}")


def describe(tensors: Mapping[str, np.ndarray]) -> str:
  """A one-line summary of the model in a release file (for mismatch messages)."""
  blocks = {int(m[1]) for k in tensors if (m := re.match(r"backbone\.layers\.(\d+)\.", k))}
  pos = tensors.get("backbone.pos_embed")
  parts = [f"ViT width {pos.shape[-1] if pos is not None else '?'}, {len(blocks)} blocks"]
  try:
    kind = head_type(tensors, "")
  except ValueError:
    return parts[0]
  prefix = "decode_head.atm." if kind == "shrunk" else "decode_head."
  stages = {m[1] for k in tensors if (m := re.match(re.escape(prefix) + r"decoder_(\d+)\.", k))}
  layers = {m[1] for k in tensors
            if (m := re.match(re.escape(prefix) + r"decoder_1\.layers\.(\d+)\.", k))}
  embed = tensors.get(prefix + "class_embed.weight")
  if embed is not None:
    parts.append(f"{HEAD_NAMES[kind]} head width {embed.shape[1]}, "
                 f"{len(stages)} stage(s) x {len(layers)} layer(s), {embed.shape[0] - 1} classes")
  if kind == "shrunk":
    qu = {m[1] for k in tensors if (m := re.match(r"decode_head\.decoder_(\d+)\.", k))}
    parts.append(f"QU over {len(qu)} tapped block(s)")
  return "; ".join(parts)


def _a(kind: str) -> str:
  return {"atm": "an ATM", "shrunk": "a Shrunk"}.get(kind, repr(kind))


def _square_side(n: int, what: str, source: str) -> int:
  if not is_square(n):
    raise ValueError(f"{source}: {what} has {n} rows, not a square grid g*g")
  return math.isqrt(n)


# ----------------------------------------------------------------------------------------------
# Import

def load(path: str, config: ml_collections.ConfigDict | str, *,
         trust_pickle: bool = False) -> tuple[Any, ml_collections.ConfigDict]:
  """Reads a release checkpoint of the model `config` (a ConfigDict or 'configs/X.py[:ARG]')
  describes. Returns our parameter tree and the model config (`config.model` with the stored
  position and query grids of the file), after a strict check against that model: a missing,
  unexpected or mis-shaped tensor fails naming the keys."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist (format {FORMAT!r})")
  config = load_config(config)
  model_cfg = ml_collections.ConfigDict(config.model.to_dict())
  if model_cfg.get("name", "segvit") != "segvit":
    raise ValueError(f"the config describes a {model_cfg.name!r} model; {FORMAT} checkpoints "
                     "are SegViT models (model.name='segvit')")
  tensors = read_torch(path, trust_pickle=trust_pickle)  # unwraps state_dict, drops the rest
  kind = head_type(tensors, path)
  want = model_cfg.head.get("type", "atm")
  if kind != want:
    marker, configs = (("decode_head.atm.*", "configs/segvit_shrunk_*.py") if kind == "shrunk"
                       else ("decode_head.decoder_*.multihead_attn.q", "configs/segvit_vit_*.py"))
    raise ValueError(f"{path} has {_a(kind)} head ({marker}) but the config describes "
                     f"{_a(want)} head (model.head.type={want!r}); use a {configs} config. "
                     f"Checkpoint: {describe(tensors)}")
  flat = to_ours(tensors, RULES[kind], source=path, layout=FORMAT, dropped=DROPPED)

  pos = flat.get("backbone/pos_embedding")
  if pos is None:
    raise ValueError(f"{path}: no backbone.pos_embed")
  g = _square_side(pos.shape[1] - 1, "backbone.pos_embed (after the cls slot)", path)
  model_cfg.backbone.posemb_grid = (g, g)
  model_cfg.backbone.posemb_resize = "bicubic"  # mmseg's ViT resizes with bicubic at run time
  if kind == "shrunk" and "head/queries" in flat:
    q = _square_side(flat["head/queries"].shape[0], "decode_head.q.weight (QU queries)", path)
    model_cfg.head.query_grid = (q, q)
  try:
    params = bundle_lib.merge_params(abstract_variables(model_cfg)["params"], unflatten(flat),
                                     source=path)
  except ValueError as e:
    raise ValueError(f"{e}\n  checkpoint: {describe(tensors)}\n  The file does not record "
                     "depth, tap layers or head counts: check that --config describes the "
                     "checkpoint's model.") from None
  return params, model_cfg


def convert(src: str, out: str, config: ml_collections.ConfigDict | str, *,
            trust_pickle: bool = False) -> str:
  """A release checkpoint -> a whole-model bundle at `out` (model config from `config` and the
  file; pixel statistics, class names and the test protocol, `eval`, from `config`)."""
  config, extra = with_recorded(config)  # the spec (options.config) and `eval`
  extra.setdefault("options", {})
  params, model_cfg = load(src, config, trust_pickle=trust_pickle)
  return bundle_lib.save_bundle(
      out, params, model_cfg, mean=config.mean, std=config.std, class_names=class_names(config),
      source=os.path.abspath(src), source_format=FORMAT, **extra)


# ----------------------------------------------------------------------------------------------
# Export

def resolved_backbone(bb: Mapping[str, Any]) -> dict[str, Any]:
  """The ViT fields a backbone config means: class defaults (of the ViT with SegViT-Shrunk's
  query down-sampling, a superset of the plain ViT's) < SegViT's (no final norm) < the
  variant's sizes < explicit fields."""
  fields = {f.name: f.default for f in dataclasses.fields(shrunk.ShrunkViT)
            if f.default is not dataclasses.MISSING}
  fields["final_norm"] = False  # build_model's SegViT default
  if bb.get("variant"):
    fields.update(vit.decode_variant(bb["variant"]))
  fields.update(bb)
  return fields


# What the release's mmseg ViT is (SegViT configs: with_cls_token=False, final_norm=False,
# LayerNorm eps 1e-6, GELU MLP, learned position embeddings, a key bias).
RELEASE_BACKBONE = dict(cls_token=True, cls_in_blocks=False, final_norm=False, layerscale=None,
                        num_registers=0, ffn="mlp", norm_eps=1e-6, rope_theta=None,
                        key_bias=True)


def _check_exportable(model_cfg: Mapping[str, Any], source: str) -> None:
  """What the release's modules cannot express, named (the parameters alone would not show
  all of it: a cls token inside the blocks has the same parameters)."""
  bb, head = resolved_backbone(model_cfg["backbone"]), dict(model_cfg["head"])
  bad = [f"backbone.{k}={bb[k]!r} (the release: {v!r})" for k, v in RELEASE_BACKBONE.items()
         if bb[k] != v]
  if head.get("mlp_ratio", 4) != 4:
    bad.append(f"head.mlp_ratio={head['mlp_ratio']} (the release: 4)")
  grids = [("backbone.posemb_grid", tuple(bb["posemb_grid"]))]
  if head.get("type", "atm") == "shrunk":
    grids.append(("head.query_grid", tuple(head["query_grid"])))
  bad += [f"{name}={grid} (the release stores a square grid)" for name, grid in grids
          if grid[0] != grid[1]]
  if bad:
    raise ValueError(f"{source}: the {FORMAT} layout cannot express this model: "
                     + "; ".join(bad))
  if bb["posemb_resize"] != "bicubic":
    logging.warning("%s resizes its position embedding with %r; mmseg's ViT uses bicubic "
                    "(same weights, other outputs at sizes other than the stored grid)",
                    source, bb["posemb_resize"])


def release_state_dict(params: Any, kind: str, source: str) -> dict[str, np.ndarray]:
  """Our parameters of a SegViT of head type `kind` ("atm" or "shrunk") -> the release's
  model tensors (float32 numpy, the release's names; no loss buffers). `segvit_jax.torch`'s
  modules load it too."""
  flat = {k: np.asarray(v) for k, v in flatten(vit.unstack_blocks(params)).items()}
  return to_theirs(flat, RULES[kind], source=source, layout=FORMAT)


def export(bundle_path: str, out: str) -> dict[str, np.ndarray]:
  """A whole-model bundle -> a release checkpoint at `out`: torch.save of
  {"state_dict": float32 tensors (the loss's class-weight buffers included, `LOSS_BUFFERS`),
  "meta": {CLASSES, PALETTE, segvit_jax: model config, pixel statistics, source}}, readable
  with torch.load(weights_only=True). Returns the state dict as numpy arrays."""
  meta = bundle_lib.read_config(bundle_path)
  model_cfg = meta.get("model", {})
  if model_cfg.get("name", "segvit") != "segvit":
    raise ValueError(f"{bundle_path} is a {model_cfg.get('name')!r} bundle; --to {FORMAT} "
                     "writes whole SegViT models (a bundle of model.name='segvit')")
  _check_exportable(model_cfg, bundle_path)
  loaded = bundle_lib.load_bundle(bundle_path)  # strict check against its model
  kind = model_cfg["head"].get("type", "atm")
  state = release_state_dict(loaded.variables["params"], kind, bundle_path)
  weights = class_weights(model_cfg["num_classes"],
                          no_object_weight(meta, RELEASE_NO_OBJECT_WEIGHT))
  state.update({key: weights.copy() for key in LOSS_BUFFERS[kind]})
  names = list(meta.get("class_names", []))
  info = {"model": model_cfg, "mean": list(meta.get("mean", [])),
          "std": list(meta.get("std", [])), "source": os.path.abspath(bundle_path)}
  write_torch_checkpoint(out, state, {
      "CLASSES": tuple(names), "PALETTE": palette(names) if names else [],
      "segvit_jax": json.loads(json.dumps(info, default=list))})
  return state
