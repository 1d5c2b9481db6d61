"""Checkpoints: the train state of a run, the best evaluation's parameters, and loading a model
from a bundle or a training workdir.

Training checkpoints: orbax `CheckpointManager` holding the train state and the grain data
iterator together (MaxText style). Writes are atomic (orbax finalises a temporary directory),
so an interrupted save never replaces the last good checkpoint; the last `keep` are kept.

Resuming (`Checkpointer.restore_newest`) takes the newest intact checkpoint. Intact means: the
step folder holds the train state item `state/` with a readable `state/_METADATA` (the tree
orbax restores by), the data-iterator state of this process (`data/process_I-of-N.json`) is
valid JSON where it is restored, the saved tree has this run's paths and shapes, and orbax then
reads every array. The first checks read only small files; the last reads the arrays. A damaged
step is skipped with a one-line warning (step, path, reason) and the next older one is tried;
once one restores, the damaged newer ones are moved aside to `STEP.damaged` in the same folder,
never deleted (left in place, orbax would refuse to save that step again and its `max_to_keep`
would delete them). With none intact the run stops with one error listing each step's reason.
A leftover `STEP.orbax-checkpoint-tmp-*` folder (a save that never finished) is not a
checkpoint: it is named in a warning and left alone.

A resumed run's config must describe the same state as the saved WORKDIR/config.json
(`check_resume_config`, before anything is written to the workdir): a change under
`RESUME_FIXED` (the model, the dataset's classes, the optimizer's learning-rate groups) is an
error listing each key (old -> new); any other change is legal and logged, one line per key.

The ViT's block layout (unrolled `encoderblock_{i}` or scanned `encoderblock` with a leading
depth axis, `vit.stack_blocks`) may differ between the saved state and the model restoring it:
`Checkpointer.restore` reads the saved layout from the checkpoint's metadata and converts
parameters and optimizer state, so a run can switch `scan_layers` and resume.

Best parameters (`config.eval.best_metric`): after each evaluation during training, results
that beat the best so far are kept as a model bundle in WORKDIR/best/, with their record
{"step", "metric", "value"} in WORKDIR/best.json (`BestKeeper`). A new best is written aside
and swapped in (`replace_dir` / `recover_dir`), so a crash never leaves a half-written best/.

`load_model(path)` takes a bundle (`segvit_jax.bundle`) or a training workdir (its config.json
and newest intact checkpoint), so eval.py, predict.py and export_bundle take either.
"""

from __future__ import annotations

import functools
import gc
import json
import logging as py_logging
import math
import os
import re
import sys
from typing import Any, Callable

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath  # orbax's own path type (orbax depends on etils)
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from segvit_jax import bundle, runtime
from segvit_jax.bundle import recover_dir, replace_dir  # noqa: F401  (atomic swaps)
from segvit_jax.models import build_model, vit


class DamagedCheckpointError(ValueError):
  """Checkpoint `step` (folder `path`) cannot be restored, for `reason` (one line). A
  ValueError, so the command-line tools report it in one line (`runtime.USER_ERRORS`)."""

  def __init__(self, step: int, path: str, reason: str):
    super().__init__(f"checkpoint {step} at {path} is damaged: {reason}")
    self.step, self.path, self.reason = step, path, reason


class NoIntactCheckpointError(ValueError):
  """A checkpoint directory holds steps, but none of them restores."""


class CheckpointMismatchError(ValueError):
  """An intact checkpoint whose saved tree differs from the state this run restores into (a
  changed model or optimizer): not damage, so no older step is tried."""


class ResumeConfigError(ValueError):
  """The config of a resumed run changes keys its checkpoints depend on."""


DAMAGED_SUFFIX = ".damaged"
_UNFINISHED = re.compile(r"\d+\.orbax-checkpoint-tmp.*")


class Checkpointer:
  """`save(step, state, data_iter)` / `restore(abstract_state, data_iter)`, and
  `restore_newest(restore)`: the newest intact checkpoint (see the module docstring)."""

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

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))  # orbax's default step naming

  def save(self, step: int, state: Any, data_iter: Any | None = None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def damage(self, step: int, with_data: bool = False) -> str | None:
    return step_damage(self.step_dir(step), with_data)

  def restore(self, abstract_state: Any, data_iter: Any | None = None,
              step: int | None = None) -> Any:
    """Restores into `abstract_state` (ShapeDtypeStructs with shardings: resharded as needed)
    and moves `data_iter` to the saved position.

    A state saved with the other ViT block layout is read in its own layout (shardings
    derived from the target's: the per-block sharding with the depth axis unsharded), then
    converted and placed with `abstract_state`'s shardings.

    Raises DamagedCheckpointError (step, path, one-line reason) when the checkpoint's files
    are damaged or orbax fails to read them, CheckpointMismatchError when the saved tree's
    paths or shapes differ from the target's."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    path = self.step_dir(step)
    reason = self.damage(step, with_data=data_iter is not None)
    if reason:
      raise DamagedCheckpointError(step, path, reason)
    try:
      metadata = self.manager.item_metadata(step)["state"]
      saved = vit.blocks_layout(metadata)
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(step, path, f"its metadata is unreadable: {_one_line(e)}")
    wanted = vit.blocks_layout(abstract_state)
    convert = None not in (saved, wanted) and saved != wanted
    target = to_layout(abstract_state, saved, abstract=True) if convert else abstract_state
    differences = tree_differences(metadata, target)
    if differences:
      raise CheckpointMismatchError(
          f"checkpoint {step} at {path} does not fit this run's train state (saved -> this "
          f"run): {'; '.join(differences)}. It was written with another model or optimizer "
          f"config: resume with that config, or train this one in a new workdir.")
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    state, reason = _read_quietly(
        lambda: self.manager.restore(step, args=ocp.args.Composite(**items))["state"])
    if reason:
      raise DamagedCheckpointError(step, path, reason)
    if convert:
      shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
      state = jax.jit(lambda s: to_layout(s, wanted), out_shardings=shardings)(state)
    return state

  def restore_newest(self, restore: Callable[[int], Any]) -> tuple[Any, int]:
    """(restore(step), step) of the newest step whose `restore` succeeds (on every process).
    `restore(step)` raises DamagedCheckpointError for a damaged step (as `restore` does): a
    warning names it and the next older step is tried. Once one restores, the damaged newer
    steps are moved aside (`set_aside`). Raises NoIntactCheckpointError when none restores,
    FileNotFoundError when there is no step at all."""
    self.warn_unfinished()
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    damaged = []
    for step in reversed(steps):
      try:
        result = _restore_everywhere(restore, step, self.step_dir(step))
      except DamagedCheckpointError as e:
        logging.warning("checkpoint %d at %s is damaged (%s): trying the one before it",
                        e.step, e.path, e.reason)
        damaged.append(e)
        continue
      self.set_aside([e.step for e in damaged])
      return result, step
    raise NoIntactCheckpointError(
        f"no intact checkpoint in {self.directory}: "
        + "; ".join(f"step {e.step}: {e.reason}" for e in damaged)
        + ". Nothing was deleted. Move the damaged step folders away to start this workdir "
        "from scratch, or train in a new workdir.")

  def set_aside(self, steps: list[int]) -> None:
    """Renames the folders of checkpoint `steps` to `STEP.damaged` (`.damaged-2`, ... when
    taken), which orbax neither lists nor deletes (process 0; the others wait)."""
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        src = self.step_dir(step)
        dst, n = src + DAMAGED_SUFFIX, 1
        while os.path.exists(dst):
          n += 1
          dst = f"{src}{DAMAGED_SUFFIX}-{n}"
        os.replace(src, dst)
        logging.warning("moved damaged checkpoint %d aside to %s (kept, not deleted)", step, dst)
    runtime.wait_for_all_processes("set_aside_damaged")
    self.manager.reload()

  def warn_unfinished(self) -> None:
    """Names the folders of saves that never finished (orbax's temporary step folders, left by
    a run killed while saving): they are not checkpoints and stay where they are."""
    if jax.process_index() != 0 or not os.path.isdir(self.directory):
      return
    for name in sorted(os.listdir(self.directory)):
      if _UNFINISHED.fullmatch(name):
        logging.warning("%s is a save that never finished (the run stopped while writing it): "
                        "not a checkpoint, ignored and left in place",
                        os.path.join(self.directory, name))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _is_abandoned_read(error: BaseException | None) -> bool:
  """An error of the array reads orbax leaves behind when one read of a step fails: the
  others' results, which nobody awaits, and tensorstore's callbacks into the closed loop."""
  text = str(error)
  return (isinstance(error, RuntimeError) and text == "Event loop is closed") or (
      text.startswith("Encountered error while reading array index"))


class _AbandonedReadFilter(py_logging.Filter):
  def filter(self, record):  # asyncio's "... exception was never retrieved"
    return not (record.exc_info and _is_abandoned_read(record.exc_info[1]))


@functools.cache  # once per process
def _drop_abandoned_read_reports() -> None:
  """From now on in this process, the reports of orbax's abandoned array reads are dropped
  (`_is_abandoned_read`): installed once, at the first read. Every other unraisable error and
  asyncio log still shows, except an unraisable "Event loop is closed" from elsewhere, which
  would be dropped too."""
  previous_hook = sys.unraisablehook

  def hook(unraisable):
    if not _is_abandoned_read(unraisable.exc_value):
      previous_hook(unraisable)

  sys.unraisablehook = hook
  py_logging.getLogger("asyncio").addFilter(_AbandonedReadFilter())


def _read_quietly(read: Callable[[], Any]) -> tuple[Any, str | None]:
  """(read(), None), or (None, the one-line reason) when it raises. An orbax read of a damaged
  step fails at its first bad array and leaves the other reads it started unawaited: each
  reports its error again when it ends or is collected (hundreds of tracebacks on stderr, some
  after the next step was read, after the one warning that names the damaged step), so those
  reports are dropped (some come before the failure reaches us)."""
  _drop_abandoned_read_reports()
  try:
    return read(), None
  except Exception as e:  # pylint: disable=broad-except
    reason = _one_line(e)
  gc.collect()  # the abandoned reads the error's frames held report now
  return None, reason


def _one_line(error: BaseException, limit: int = 600) -> str:
  """`TypeName: the first line of the message` of `error` and of its innermost cause (orbax
  wraps tensorstore's error, which names the array and the file), cut to `limit` characters."""
  def first_line(e):
    lines = str(e).strip().splitlines()
    line = lines[0].split(" See full TensorStore details")[0] if lines else ""
    return f"{type(e).__name__}: {line}"
  cause = error
  while (cause.__cause__ or cause.__context__) is not None:
    cause = cause.__cause__ or cause.__context__
  text = first_line(error) + (f" ({first_line(cause)})" if cause is not error else "")
  return text if len(text) <= limit else text[:limit - 3] + "..."


def step_damage(path: str, with_data: bool = False) -> str | None:
  """Why the checkpoint in step folder `path` is not intact, found from its small files alone
  (no array is read), or None. `with_data`: this process's data-iterator state must be
  readable too."""
  if not os.path.isdir(path):
    return "the step folder is missing"
  if not os.listdir(path):
    return "the step folder is empty"
  if not os.path.isdir(os.path.join(path, "state")):
    return "it has no state/ item (the train state)"
  reason = _json_damage(os.path.join(path, "state", "_METADATA"), "state/_METADATA")
  if reason:
    return reason
  if with_data:
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"  # grain's naming
    return _json_damage(os.path.join(path, "data", name), f"data/{name}")
  return None


def _json_damage(path: str, name: str) -> str | None:
  """Why the JSON file `path` (called `name` in messages) is damaged, or None."""
  if not os.path.isfile(path):
    return f"{name} is missing"
  try:
    with open(path) as f:
      json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    return f"{name} is not valid JSON ({e})"
  return None


def _restore_everywhere(restore: Callable[[int], Any], step: int, path: str) -> Any:
  """`restore(step)`, a failure anywhere a failure everywhere: with several processes each
  says whether its part restored (one all-gather), so all of them fall back together."""
  error, result = None, None
  try:
    result = restore(step)
  except DamagedCheckpointError as e:
    error = e
  if jax.process_count() > 1:
    ok = multihost_utils.process_allgather(np.int32(error is None))
    if error is None and not np.all(ok):
      bad = [int(i) for i in np.flatnonzero(np.asarray(ok) == 0)]
      error = DamagedCheckpointError(step, path, f"damaged on process(es) {bad}")
  if error is not None:
    raise error
  return result


def _path_names(path: tuple) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'a/b/c': shape} of a pytree's leaves: arrays, ShapeDtypeStructs or orbax metadata
  (whose dict keys name sequence positions as strings, hence the common spelling)."""
  return {"/".join(_path_names(p)): tuple(leaf.shape)
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_differences(saved: Any, wanted: Any, limit: int = 12) -> list[str]:
  """The leaves whose path or shape differ between `saved` and `wanted`, one entry each
  (`path: saved shape -> wanted shape`, `(absent)` for a missing one), the first `limit`."""
  a, b = tree_shapes(saved), tree_shapes(wanted)
  out = [f"{k}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}"
         for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
  return out if len(out) <= limit else out[:limit] + [f"... {len(out) - limit} more"]


# ---------------------------------------------------------------------------------------------
# The config of a resumed run against the one its checkpoints were written with.

# The keys (dotted prefixes) a training checkpoint depends on: the model (its parameters'
# shapes), the dataset's classes, and the optimizer's learning-rate groups (each group has its
# own state, named after its factor: `optim.lr_mults`, `optim.layer_decay`,
# `optim.layer_decay_skip_last`).
RESUME_FIXED = ("model", "dataset.num_classes", "optim.lr_mults", "optim.layer_decay",
                "optim.layer_decay_skip_last")
# Model keys that change how the model computes, not its parameters: free on resume
# (`scan_layers`: the block layout is converted on restore).
RESUME_FREE_MODEL_KEYS = frozenset(
    {"dtype", "remat", "remat_policy", "scan_layers", "drop_path", "dropout", "attention"})
RUN_CONFIG = "config.json"
# Keys added to the skeleton after runs were written: a saved config without one had the value
# given here (the skeleton's default), so its absence is no change.
ADDED_KEYS = {"optim.layer_decay_skip_last": 0}


def flatten_config(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'a.b.c': value} of a nested dict (a config as JSON); an empty dict is a value."""
  if not isinstance(tree, dict) or not tree:
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(flatten_config(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def is_fixed_on_resume(key: str) -> bool:
  """Whether a change of config `key` (dotted) makes a run's checkpoints unloadable."""
  if key.startswith("model.") and key.rsplit(".", 1)[-1] in RESUME_FREE_MODEL_KEYS:
    return False
  return any(key == p or key.startswith(p + ".") for p in RESUME_FIXED)


def config_changes(saved: dict, new: dict) -> tuple[list[str], list[str]]:
  """(fixed, free): the changed keys of two configs (as JSON), `key: old -> new` each,
  split by `is_fixed_on_resume`."""
  a, b = flatten_config(saved), flatten_config(new)
  a.update({k: v for k, v in ADDED_KEYS.items() if k not in a and k in b})
  show = lambda d, k: json.dumps(d[k]) if k in d else "(absent)"  # noqa: E731
  fixed, free = [], []
  for key in sorted(set(a) | set(b)):
    if a.get(key, KeyError) != b.get(key, KeyError):
      (fixed if is_fixed_on_resume(key) else free).append(
          f"{key}: {show(a, key)} -> {show(b, key)}")
  return fixed, free


def has_checkpoints(directory: str) -> bool:
  """Whether `directory` holds any step folder (intact or not)."""
  return os.path.isdir(directory) and any(
      n.isdigit() and os.path.isdir(os.path.join(directory, n)) for n in os.listdir(directory))


def check_resume_config(workdir: str, config: ml_collections.ConfigDict,
                        checkpoint_dir: str | None = None) -> None:
  """Compares `config` with WORKDIR/config.json when the workdir holds checkpoints (reads
  only): a change of a key its checkpoints depend on (`is_fixed_on_resume`) raises
  ResumeConfigError listing each (old -> new); other changes are logged, one line per key.
  Nothing is checked for a fresh workdir, or where config.json is missing."""
  checkpoint_dir = checkpoint_dir or os.path.join(workdir, "checkpoints")
  path = os.path.join(workdir, RUN_CONFIG)
  if not (os.path.isfile(path) and has_checkpoints(checkpoint_dir)):
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ResumeConfigError(
        f"{path} is corrupt ({e}); it records the config of the checkpoints in "
        f"{checkpoint_dir}, which this run would resume. Restore it, or move it away to "
        f"resume without the comparison.") from None
  fixed, free = config_changes(saved, json.loads(config.to_json_best_effort()))
  if fixed:
    raise ResumeConfigError(
        f"this config cannot resume the checkpoints in {checkpoint_dir}: it changes keys they "
        f"depend on (saved in {path} -> this run): {'; '.join(fixed)}. Resume with the saved "
        f"values, or train this config in a new workdir (config.model_init can start it from "
        f"this run's weights).")
  for change in free:
    logging.warning("config changed since %s was written (allowed on resume): %s", path, change)


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
  `directory` is a checkpoint root (with step subdirectories).

  Without `step`, the newest intact checkpoint: a damaged newer one is skipped with a warning
  naming it and why (read-only: nothing is moved; a training resume sets it aside). A given
  `step` that is damaged is a DamagedCheckpointError."""
  directory = os.path.abspath(directory)
  steps = saved_steps(directory)[::-1] if step is None else [step]
  if not steps:
    raise FileNotFoundError(f"no checkpoint found in {directory}")
  # An explicit single-device target: without one, orbax rebuilds the shardings the checkpoint
  # was saved with and fails on any other device count ("Topology mismatch detected").
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def read(step):
    path = os.path.join(directory, str(step))  # orbax's default step naming
    reason = step_damage(path)
    if reason:
      raise DamagedCheckpointError(step, path, reason)
    state, reason = _read_quietly(lambda: read_state_item(os.path.join(path, "state"), device))
    if reason:
      raise DamagedCheckpointError(step, path, reason)
    return state

  damaged = []
  for step in steps:
    try:
      state = read(step)
      break
    except DamagedCheckpointError as e:
      if len(steps) == 1:
        raise
      logging.warning("checkpoint %d at %s is damaged (%s): reading the one before it",
                      e.step, e.path, e.reason)
      damaged.append(e)
  else:
    raise NoIntactCheckpointError(
        f"no intact checkpoint in {directory}: "
        + "; ".join(f"step {e.step}: {e.reason}" for e in damaged))
  if with_model_state:
    return state["params"], step, dict(state.get("model_state") or {})
  return state["params"], step


def saved_steps(directory: str) -> list[int]:
  """The steps of the checkpoint folders in `directory`, ascending: orbax's default step naming
  (a folder named by the step number). A save that never finished (`STEP.orbax-checkpoint-tmp-*`)
  and a step set aside (`STEP.damaged`) are not steps; a step folder may still be damaged
  (`step_damage`)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def read_state_item(path: str, sharding: jax.sharding.Sharding) -> Any:
  """The train state saved in the item folder `path` (STEP/state), every array placed with
  `sharding`. Read with the item's own handler, not a CheckpointManager: a manager opened to
  read one item warns about every other item of the step (the data iterator's "Item 'data' was
  found in the checkpoint, but could not be restored") and, read-only, about each option it
  resets, none of which is a problem."""
  handler = ocp.StandardCheckpointHandler()
  try:
    item = epath.Path(path)
    metadata = handler.metadata(item)
    tree = getattr(metadata, "tree", metadata)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          tree)
    return handler.restore(item, args=ocp.args.StandardRestore(target))
  finally:
    handler.close()


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
  and checkpoint `step` (default: the newest intact one), with the workdir's class names (classes.txt)
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
