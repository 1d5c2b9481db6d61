"""Training checkpoints: orbax `CheckpointManager` holding the train state and the grain data
iterator together (MaxText style). Writes are atomic (orbax finalises a temporary directory),
so an interrupted save never replaces the last good checkpoint; the last `keep` are kept.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


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
    and moves `data_iter` to the saved position."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(directory: str, step: int | None = None) -> tuple[dict, int]:
  """Reads only the parameters of a training checkpoint (no optimizer, no data state), on the
  host/default device. `directory` is a checkpoint root (with step subdirectories)."""
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
  return state["params"], step
