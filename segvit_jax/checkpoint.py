"""Checkpoints: the train state of a run, the best evaluation's parameters, and loading a model
from a bundle or a training workdir.

Training checkpoints: orbax `CheckpointManager` holding the train state and the grain data
iterator together (MaxText style). Writes are atomic (orbax finalises a temporary directory),
so an interrupted save never replaces the last good checkpoint; the last `keep` are kept.

The ViT's block layout (unrolled `encoderblock_{i}` or scanned `encoderblock` with a leading
depth axis, `vit.stack_blocks`) may differ between the saved state and the model restoring it:
`Checkpointer.restore` reads the saved layout from the checkpoint's metadata and converts
parameters and optimizer state, so a run can switch `scan_layers` and resume.

Best parameters (`config.eval.best_metric`): after each evaluation during training, results
that beat the best so far are kept as a model bundle in WORKDIR/best/, with their record
{"step", "metric", "value"} in WORKDIR/best.json (`BestKeeper`). A new best is written aside
and swapped in (`replace_dir` / `recover_dir`), so a crash never leaves a half-written best/.

`load_model(path)` takes a bundle (`segvit_jax.bundle`) or a training workdir (its config.json
and latest checkpoint), so eval.py, predict.py and export_bundle take either.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from typing import Any, Callable

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from segvit_jax import bundle, runtime
from segvit_jax.models import build_model, vit


class Checkpointer:
  """`save(step, state, data_iter)` / `restore(abstract_state, data_iter)`."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()},
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any | None = None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state: Any, data_iter: Any | None = None,
              step: int | None = None) -> Any:
    """Restores into `abstract_state` (ShapeDtypeStructs with shardings: resharded as needed)
    and moves `data_iter` to the saved position.

    A state saved with the other ViT block layout is read in its own layout (shardings
    derived from the target's: the per-block sharding with the depth axis unsharded), then
    converted and placed with `abstract_state`'s shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    saved = vit.blocks_layout(self.manager.item_metadata(step)["state"])
    wanted = vit.blocks_layout(abstract_state)
    convert = None not in (saved, wanted) and saved != wanted
    target = to_layout(abstract_state, saved, abstract=True) if convert else abstract_state
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    state = self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
    if convert:
      shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
      state = jax.jit(lambda s: to_layout(s, wanted), out_shardings=shardings)(state)
    return state

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def to_layout(tree: Any, layout: str, abstract: bool = False) -> Any:
  """`tree` with its ViT blocks in `layout` ("stacked" / "unstacked"). With `abstract`, the
  leaves are ShapeDtypeStructs whose NamedShardings gain (stacking) or lose (unstacking) an
  unsharded leading depth axis."""
  if layout == "stacked":
    return vit.stack_blocks(tree, _stack_abstract) if abstract else vit.stack_blocks(tree)
  if layout == "unstacked":
    return vit.unstack_blocks(tree, _take_abstract) if abstract else vit.unstack_blocks(tree)
  raise ValueError(f"unknown block layout {layout!r}; expected 'stacked' or 'unstacked'")


def _depth_sharding(sharding: Any, add: bool) -> Any:
  if isinstance(sharding, NamedSharding):
    spec = (None, *sharding.spec) if add else tuple(sharding.spec)[1:]
    return NamedSharding(sharding.mesh, P(*spec), memory_kind=sharding.memory_kind)
  if sharding is None or sharding.is_fully_replicated:  # any shape: keep as it is
    return sharding
  raise ValueError(f"cannot derive a block sharding from {sharding}: expected a NamedSharding")


def _stack_abstract(leaves):
  x = leaves[0]
  return jax.ShapeDtypeStruct((len(leaves), *x.shape), x.dtype,
                              sharding=_depth_sharding(x.sharding, add=True))


def _take_abstract(x, i):
  del i
  return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=_depth_sharding(x.sharding, False))


def restore_params(directory: str, step: int | None = None, *,
                   with_model_state: bool = False) -> tuple:
  """Reads the parameters of a training checkpoint (no optimizer, no data state), on the
  host/default device, in the block layout they were saved in (`bundle.merge_params` converts):
  (params, step), or (params, step, model_state) with `with_model_state` (the other variable
  collections, e.g. batch_stats; {} for models without any or checkpoints from before them).
  `directory` is a checkpoint root (with step subdirectories)."""
  mngr = ocp.CheckpointManager(os.path.abspath(directory),
                               options=ocp.CheckpointManagerOptions(read_only=True),
                               item_handlers={"state": ocp.StandardCheckpointHandler()})
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found in {directory}")
  # An explicit single-device target: without one, orbax rebuilds the shardings the checkpoint
  # was saved with and fails on any other device count ("Topology mismatch detected").
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        mngr.item_metadata(step)["state"])
  state = mngr.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  mngr.close()
  if with_model_state:
    return state["params"], step, dict(state.get("model_state") or {})
  return state["params"], step


def saved_process_count(checkpoint_dir: str, step: int) -> int | None:
  """How many processes wrote the data-iterator state of checkpoint `step` (grain writes
  `STEP/data/process_I-of-N.json`, one per process); None when it holds no iterator state."""
  data_dir = os.path.join(checkpoint_dir, str(step), "data")  # orbax's default step naming
  names = os.listdir(data_dir) if os.path.isdir(data_dir) else []
  counts = {int(m.group(1)) for m in
            (re.fullmatch(r"process_\d+-of-(\d+)\.json", n) for n in names) if m}
  if len(counts) > 1:
    raise ValueError(f"{data_dir} mixes iterator states of {sorted(counts)} processes")
  return counts.pop() if counts else None


def load_model(path: str, step: int | None = None) -> bundle.Bundle:
  """A model bundle directory (`bundle.load_bundle`), or a training workdir: its config.json
  and checkpoint `step` (default: the latest), with the workdir's class names (classes.txt)
  and panoptic categories. Either way a `Bundle` whose variables are laid out as its model
  needs them (`bundle.merge_params`)."""
  path = os.path.abspath(path)
  if bundle.is_bundle(path):
    return bundle.load_bundle(path)
  meta = bundle.read_config(path)
  if "model" not in meta or "dataset" not in meta:
    raise ValueError(f"{path}/config.json is neither a bundle nor a training config")
  config = ml_collections.ConfigDict(meta)
  model = build_model(config.model)
  params, step, state = restore_params(os.path.join(path, "checkpoints"), step,
                                       with_model_state=True)
  abstract = bundle.abstract_variables(model, config.model)
  params = bundle.merge_params(abstract["params"], params, source=path)
  state = bundle.merge_state(abstract, state, source=path)
  classes_file = os.path.join(path, "classes.txt")
  if os.path.isfile(classes_file):
    with open(classes_file) as f:
      class_names = [line.rstrip("\n") for line in f if line.strip()]
  else:
    class_names = [f"class_{i}" for i in range(config.model.num_classes)]
  extra = {"eval": meta["eval"]} if meta.get("eval") else {}  # the test protocol
  categories_file = os.path.join(path, bundle.CATEGORIES_FILE)
  if os.path.isfile(categories_file):
    with open(categories_file) as f:
      extra["categories"] = json.load(f)
  bundle_cfg = ml_collections.ConfigDict({
      "format": bundle.FORMAT, "version": bundle.VERSION, "model": meta["model"],
      "mean": meta["mean"], "std": meta["std"], "class_names": class_names,
      "step": step, "source": path, **extra})
  return bundle.Bundle(model=model, variables={"params": params, **state}, config=bundle_cfg)


# ---------------------------------------------------------------------------------------------
# Replacing a directory atomically.

def write_json(path: str, obj: Any) -> None:
  """Writes `obj` to `path` through a temporary file and a rename: never half written."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


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


# ---------------------------------------------------------------------------------------------
# The best evaluation's parameters, kept in WORKDIR/best/.

BEST_DIR = "best"
BEST_RECORD = "best.json"


def is_improvement(value: float, best: float | None) -> bool:
  """Whether evaluation result `value` beats `best` (higher is better, strictly greater).
  NaN never wins; any other value beats no best (None)."""
  return not math.isnan(value) and (best is None or value > best)


def read_best(workdir: str) -> dict | None:
  """The record {"step", "metric", "value"} of the parameters kept in WORKDIR/best/, or None.

  WORKDIR/best.json is written after best/ is swapped in, and the bundle in best/ carries the
  same record (its config.json's "best"): where a crash fell between the two writes they
  differ, and the bundle's record, which describes the parameters on disk, wins."""
  path = os.path.join(workdir, BEST_DIR)
  in_bundle = bundle.read_config(path).get("best") if bundle.is_bundle(path) else None
  record_file = os.path.join(workdir, BEST_RECORD)
  record = None
  if os.path.isfile(record_file):
    with open(record_file) as f:
      record = json.load(f)
  if record != in_bundle:
    logging.warning("%s says %s but %s holds %s: keeping the latter", record_file, record,
                    path, in_bundle)
    if in_bundle is None:
      os.remove(record_file)
    else:
      write_json(record_file, in_bundle)
  return in_bundle


class BestKeeper:
  """Keeps the parameters of the best evaluation so far as a model bundle in WORKDIR/best/
  (`bundle.save_bundle`, with its record as config.json's "best") and the record
  {"step", "metric", "value"} in WORKDIR/best.json.

  Every process calls `update` after each evaluation (gathering sharded parameters is a
  collective); process 0 decides and writes. A new best is written to WORKDIR/best.tmp/ and
  swapped in (`replace_dir`), so a crash never leaves a half-written best/ nor loses the
  previous one. A resumed run reads the record back (`read_best`); a record of another metric
  is dropped (the next evaluation replaces best/).
  """

  def __init__(self, workdir: str, metric: str, **bundle_kwargs):
    """`bundle_kwargs`: `model_cfg`, `mean`, `std`, `class_names` and extra entries of the
    bundle's config.json (`bundle.save_bundle`)."""
    self.workdir, self.metric, self.bundle_kwargs = workdir, metric, bundle_kwargs
    self.path = os.path.join(workdir, BEST_DIR)
    self.active = jax.process_index() == 0
    self.best = None
    if self.active:
      recover_dir(self.path)
      self.best = read_best(workdir)
      if self.best is not None and self.best["metric"] != metric:
        logging.warning("%s keeps the best %s; this run keeps the best %s: the next "
                        "evaluation replaces it", self.path, self.best["metric"], metric)
        self.best = None

  def update(self, step: int, results: dict, get_variables: Callable[[], Any]) -> bool:
    """Writes `get_variables()` (called on every process; (params, model_state) as host arrays
    on process 0) as the new best if `results[metric]` beats the best so far. Returns whether
    it did."""
    if self.metric not in results:
      raise KeyError(f"config.eval.best_metric={self.metric!r} is not an evaluation result; "
                     f"expected one of {sorted(k for k in results if k != 'per_class')}")
    value = float(results[self.metric])
    improved = self.active and is_improvement(
        value, None if self.best is None else self.best["value"])
    if jax.process_count() > 1:  # process 0's decision: every process must gather, or none
      improved = bool(multihost_utils.broadcast_one_to_all(np.int32(improved)))
    if not improved:
      if self.active:
        logging.info("%s %.2f at step %d: best stays %s", self.metric, value, step,
                     self._describe(self.best))
      return False
    variables = get_variables()
    if self.active:
      params, model_state = variables
      record = {"step": step, "metric": self.metric, "value": value}
      recover_dir(self.path)  # a leftover best.tmp/
      bundle.save_bundle(self.path + ".tmp", params, step=step, best=record,
                         model_state=model_state, **self.bundle_kwargs)
      replace_dir(self.path + ".tmp", self.path)
      write_json(os.path.join(self.workdir, BEST_RECORD), record)
      logging.info("new best %s %.2f at step %d (was %s): wrote %s", self.metric, value, step,
                   self._describe(self.best), self.path)
      self.best = record
    # The others wait here, not in a collective that times out.
    runtime.wait_for_all_processes("best")
    return True

  @staticmethod
  def _describe(record: dict | None) -> str:
    return "none" if record is None else f"{record['value']:.2f} at step {record['step']}"
