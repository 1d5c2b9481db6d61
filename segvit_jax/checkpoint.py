"""Training checkpoints: orbax `CheckpointManager` holding the train state and the grain data
iterator together (MaxText style). Writes are atomic (orbax finalises a temporary directory),
so an interrupted save never replaces the last good checkpoint; the last `keep` are kept.

The ViT's block layout (unrolled `encoderblock_{i}` or scanned `encoderblock` with a leading
depth axis, `vit.stack_blocks`) may differ between the saved state and the model restoring it:
`Checkpointer.restore` reads the saved layout from the checkpoint's metadata and converts
parameters and optimizer state, so a run can switch `scan_layers` and resume.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from segvit_jax.models import vit


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
