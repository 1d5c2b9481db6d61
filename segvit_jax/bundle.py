"""Model bundles: one directory format for a trained or converted model without optimizer
state, the unit that converters write and inference reads.

  BUNDLE/config.json   {"format": "segvit_jax.bundle", "version": 1, "model": {...},
                        "mean": [...], "std": [...], "class_names": [...], ...}
  BUNDLE/params/       the parameters, an orbax PyTree checkpoint, ViT blocks always in the
                       unstacked layout (`encoderblock_{i}`, whatever `scan_layers` says)

`load_bundle(path)` returns a `Bundle` with `model`, `variables`, `config` and
`predict(images)`: uint8 (B, H, W, 3) -> per-class scores (B, C, H, W) float32 at the input
resolution, through the one inference path of eval.py and predict.py
(`segvit_jax.evaluation.inference.MultiScalePredictor`) under the bundle's test protocol: the
`eval` entry of its config.json (a training run's `config.eval`, or the `--config` a converter
was given), or the whole image where it records none (padded by the model family's rule,
`segvit_jax.models.PADDING_RULES`).

`segvit_jax.checkpoint.load_model(path)` also accepts a training workdir (its `config.json`
and latest checkpoint), so eval.py and predict.py take either. Loading converts the ViT block
layout (unstacked in bundles, stacked in the checkpoints of `scan_layers` runs) to the model's
(`merge_params`): a `Bundle`'s variables are laid out as its model needs them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from segvit_jax.evaluation import inference
from segvit_jax.models import build_backbone, build_model, input_divisor, vit

FORMAT = "segvit_jax.bundle"
# A training workdir's panoptic categories ([{id, name, isthing}] in class order).
CATEGORIES_FILE = "categories.json"
VERSION = 1


PROTOCOLS = ("model", "whole")


def check_images(images: Any) -> np.ndarray:
  """`images` as a uint8 (B, H, W, 3) array; ValueError saying what is expected otherwise."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"predict expects uint8 RGB images (B, H, W, 3) with values 0..255, got "
                     f"dtype {images.dtype}: pass the decoded image as it is (the bundle "
                     "normalises with its own mean / std)")
  if images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape:
    raise ValueError(f"predict expects uint8 images (B, H, W, 3), got shape {images.shape}")
  return images


@dataclasses.dataclass
class Bundle:
  model: Any
  variables: dict
  config: ml_collections.ConfigDict
  _predictors: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def protocol(self, protocol: str = "model") -> inference.Protocol:
    """The test protocol `predict` runs: "model" (the recorded one, else "whole") or "whole"
    (the raw whole-image output)."""
    if protocol not in PROTOCOLS:
      raise ValueError(f"protocol={protocol!r}: expected one of {PROTOCOLS}")
    if protocol == "model" and self.config.get("eval") is not None:
      return inference.Protocol.from_config(self.config)
    return inference.Protocol.whole(self.config.model)

  def predictor(self, protocol: str = "model") -> inference.MultiScalePredictor:
    """The semantic predictor of `protocol` (`protocol()`), built once per protocol."""
    if self.config.model.get("name") == "vit":
      raise ValueError("this is a backbone bundle (no decode head): use "
                       "segvit_jax.backbone_features(bundle, images) instead of predict")
    p = self.protocol(protocol)
    if p not in self._predictors:
      apply_fn = lambda v, x: self.model.apply(v, x)["semantic_scores"]  # noqa: E731
      self._predictors[p] = inference.MultiScalePredictor(
          apply_fn, self.variables, p, self.config.model.num_classes, mean=self.config.mean,
          std=self.config.std)
    return self._predictors[p]

  def predict(self, images: np.ndarray, protocol: str = "model") -> np.ndarray:
    """uint8 (B, H, W, 3) -> scores (B, C, H, W) float32 at the input resolution under the
    test `protocol` ("model": the bundle's recorded protocol, or the whole image where it
    records none; "whole": the raw whole-image output). One view: the model's semantic
    scores; several (scales x flips): the mean of their softmax probabilities (average
    "softmax") or scores."""
    images = check_images(images)
    predictor = self.predictor(protocol)
    totals = predictor.predict_many(list(images))
    return np.stack([predictor.mean_scores(t, images.shape[1:3]) for t in totals])

  @functools.cached_property
  def _features_fn(self):
    cfg = self.config.model
    model, params = build_backbone(cfg), self.variables["params"]
    if cfg.get("name") != "vit":  # a whole model: its backbone's parameters
      params = params["backbone"]

    def run(p, x):
      tokens, aux = model.apply({"params": p}, x)
      out = {"blocks": aux["blocks"]}
      if getattr(model, "final_norm", False):  # (an MiT has none)
        out["normed"] = tokens
      return out

    return functools.partial(jax.jit(run), params)

  def backbone_features(self, images) -> dict[str, Any]:
    """See `segvit_jax.backbone_features`."""
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"backbone_features expects normalised float images (B, H, W, 3), "
                       f"got {images.shape}")
    return self._features_fn(images.astype(jnp.float32))


def backbone_features(bundle: "Bundle | str", images) -> dict[str, Any]:
  """Backbone features of normalised NHWC float images (H, W divisible by the patch size; the
  position embedding is resized on the fly):
    {"blocks": [(B, h, w, D) patch tokens after each block, before the final norm],
     "normed": (B, h, w, D) patch tokens after the final norm (backbones that have one)}.
  `bundle` is a `Bundle` or the path of a bundle (backbone or whole model)."""
  if isinstance(bundle, str):
    bundle = load_bundle(bundle)
  return bundle.backbone_features(images)


def save_bundle(path: str, params: Any, model_cfg: Mapping[str, Any], *, mean, std,
                class_names, model_state: Mapping[str, Any] | None = None, **extra) -> str:
  """Writes a bundle directory (params through orbax; ViT blocks unstacked), and the model's
  other variable collections (`model_state`, e.g. BatchNorm's batch_stats) in `state/` when
  there are any, replacing a bundle at `path`.

  Atomically: the bundle is written whole to `path.tmp/` next to it and then moved in place
  (`checkpoint.replace_dir`), so a write that fails (a full disk, an error, a kill) leaves the
  bundle that was at `path` intact; the half-written `path.tmp/` of a failed write is removed,
  that of a killed one by the next write (`checkpoint.recover_dir`).

  The calling process writes alone, from host copies of `params`: in a multi-process run the
  others need not call it (the trainer writes its best bundle from process 0 only)."""

  path = os.path.abspath(path)
  model_cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
  meta = {"format": FORMAT, "version": VERSION, "model": model_cfg, "mean": list(mean),
          "std": list(std), "class_names": list(class_names), **extra}
  recover_dir(path)  # what a killed write left: path.tmp/, path.old/
  tmp = path + ".tmp"
  os.makedirs(os.path.dirname(path), exist_ok=True)
  me = jax.process_index()
  alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
  try:
    os.makedirs(tmp)
    with ocp.StandardCheckpointer(multiprocessing_options=alone) as ckptr:
      ckptr.save(os.path.join(tmp, "params"), vit.unstack_blocks(jax.device_get(params)))
      if model_state:
        ckptr.save(os.path.join(tmp, "state"), jax.device_get(dict(model_state)))
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(meta, f, indent=2, default=_json_value)
    replace_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def _json_value(o: Any) -> Any:
  """config.json's spelling of what json does not write itself: ConfigDicts as dicts, tuples
  as lists, anything else as its str."""
  if hasattr(o, "to_dict"):
    return o.to_dict()
  return list(o) if isinstance(o, tuple) else str(o)


def read_config(path: str) -> dict:
  """The `config.json` of a bundle or workdir, as a dict."""
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(
        f"{file} not found: expected a model bundle (config.json + params/) or a training "
        "workdir (config.json + checkpoints/)")
  with open(file) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{file} is not valid JSON, the file is corrupt or truncated: {e}") from None


def is_bundle(path: str) -> bool:
  try:
    return read_config(path).get("format") == FORMAT
  except (FileNotFoundError, ValueError):  # no config.json, or not JSON
    return False


def load_params(path: str) -> Any:
  """The parameters of a bundle, as numpy arrays on the host."""
  meta = read_config(path)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}/config.json is not a {FORMAT} bundle (format="
                     f"{meta.get('format')!r})")
  with ocp.StandardCheckpointer() as ckptr:
    return jax.device_get(ckptr.restore(os.path.join(os.path.abspath(path), "params")))


def load_model_state(path: str) -> dict:
  """A bundle's variable collections besides the parameters (`state/`), {} without any."""
  state_dir = os.path.join(os.path.abspath(path), "state")
  if not os.path.isdir(state_dir):
    return {}
  with ocp.StandardCheckpointer() as ckptr:
    return dict(jax.device_get(ckptr.restore(state_dir)))


def load_bundle(path: str) -> Bundle:
  """Loads a bundle, checking its parameters (and other collections) against the model its
  config describes."""
  meta = read_config(path)
  config = ml_collections.ConfigDict(meta)
  model = build_model(config.model)
  abstract = abstract_variables(model, config.model)
  params = merge_params(abstract["params"], load_params(path), source=path)
  state = merge_state(abstract, load_model_state(path), source=path)
  return Bundle(model=model, variables={"params": params, **state}, config=config)


def merge_state(abstract: Mapping[str, Any], state: Mapping[str, Any], *, source: str) -> dict:
  """The loaded non-parameter collections checked strictly against the model's."""
  want = {k: v for k, v in abstract.items() if k != "params"}
  if set(want) != set(state):
    raise ValueError(f"{source}: holds variable collections {sorted(state)} besides the "
                     f"parameters, the model has {sorted(want)}")
  return {k: merge_params(want[k], state[k], source=f"{source} ({k})") for k in want}


def probe_input(model_cfg: Mapping[str, Any]) -> jax.Array:
  """An input every model of `model_cfg` takes, to build its variables' shapes. They do not
  depend on the input size (stored grids are config fields), so any valid input does: the
  first multiple of what inputs must be multiples of (the patch, 32, ...) that is at least
  64 px and 2 of them."""
  d = input_divisor(model_cfg)
  side = d * max(2, -(-64 // d))
  return jnp.zeros((1, side, side, 3))


def abstract_variables(model, model_cfg) -> Any:
  """The model's variables as shapes (unboxed; from `probe_input`)."""
  x = probe_input(model_cfg)
  return flax.linen.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), x)))


def merge_params(init: Any, loaded: Any, *, source: str = "checkpoint") -> Any:
  """Strict merge (big_vision `merge_params`): every parameter of `init` must be in `loaded`
  with the same shape and nothing else may be there. Fails with a readable list of missing,
  unexpected and mis-shaped keys; returns `loaded` arranged like `init`, cast to its dtypes.

  Either ViT block layout merges into either: both sides are compared in the unstacked layout
  (so mismatches name `encoderblock_{i}` keys) and the result is stacked again when `init` is
  (`vit.stack_blocks`)."""
  stacked = vit.blocks_layout(init) == "stacked"
  init = vit.unstack_blocks(flax.core.unfreeze(init),
                            lambda x, i: jax.ShapeDtypeStruct(x.shape[1:], x.dtype))
  loaded = vit.unstack_blocks(flax.core.unfreeze(loaded))
  flat_init = flax.traverse_util.flatten_dict(init, sep="/")
  flat_loaded = flax.traverse_util.flatten_dict(loaded, sep="/")
  missing = sorted(set(flat_init) - set(flat_loaded))
  unexpected = sorted(set(flat_loaded) - set(flat_init))
  misshaped = sorted(
      f"{k}: expected {tuple(flat_init[k].shape)}, got {tuple(np.shape(flat_loaded[k]))}"
      for k in set(flat_init) & set(flat_loaded)
      if tuple(flat_init[k].shape) != tuple(np.shape(flat_loaded[k])))
  if missing or unexpected or misshaped:
    lines = [f"parameters from {source} do not match the model:"]
    for title, keys in (("missing", missing), ("unexpected", unexpected),
                        ("mis-shaped", misshaped)):
      if keys:
        shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
        lines.append(f"  {title} ({len(keys)}): " + ", ".join(shown))
    raise ValueError("\n".join(lines))
  merged = {k: np.asarray(flat_loaded[k]).astype(flat_init[k].dtype) for k in flat_init}
  merged = flax.traverse_util.unflatten_dict(merged, sep="/")
  return vit.stack_blocks(merged) if stacked else merged


def replace_dir(src: str, dst: str) -> None:
  """Moves the complete directory `src` to `dst`, replacing `dst`. POSIX cannot swap two
  directories in one rename, so the old `dst` steps aside to `dst.old` first: a crash leaves
  `dst` whole (old or new) or, between the two renames, missing with the old one whole in
  `dst.old`, which `recover_dir(dst)` moves back."""
  old = dst + ".old"
  if os.path.exists(old):
    shutil.rmtree(old)
  if os.path.exists(dst):
    os.replace(dst, old)
  try:
    os.replace(src, dst)
  except BaseException:
    if os.path.exists(old) and not os.path.exists(dst):
      os.replace(old, dst)
    raise
  shutil.rmtree(old, ignore_errors=True)


def recover_dir(dst: str) -> None:
  """Undoes what a crash inside `replace_dir` (or before it) left: drops the half-written
  `dst.tmp`, and moves `dst.old` back when `dst` is missing."""
  tmp, old = dst + ".tmp", dst + ".old"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  if os.path.exists(old):
    if os.path.exists(dst):
      shutil.rmtree(old)
    else:
      os.replace(old, dst)
      logging.warning("restored %s from %s (a run stopped while replacing it)", dst, old)
