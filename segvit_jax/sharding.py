"""Device mesh and logical-axis sharding (Flax lm1b / MaxText style).

Mesh axes: `data` (batch), `fsdp` (batch and parameter shards), `tensor` (heads / MLP).
Parameters and activations carry logical axis names (see `segvit_jax.models.layers`); the
rules below map them to mesh axes. With `fsdp = tensor = 1` this is plain data parallelism.
A batch goes onto the mesh with `global_batch`; `gather_params` brings sharded arrays back to
process 0. (Several processes: `segvit_jax.runtime` starts them.)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("classes", None),
    ("queries", None),
    # The stacked-layers axis of a scanned ViT (nn.scan over blocks): every device holds all
    # layers' (sharded) slices, the scan steps through them.
    ("layers", None),
)


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves {data, fsdp, tensor} sizes; one of them may be -1 (all remaining devices)."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh {dict(mesh_cfg)}: at most one axis may be -1")
  if any(s < 1 and s != -1 for s in sizes):
    raise ValueError(f"config.mesh {dict(mesh_cfg)}: sizes must be positive (or -1 for all "
                     "remaining devices)")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh {dict(mesh_cfg)} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"config.mesh {dict(mesh_cfg)} needs {int(np.prod(sizes))} devices, "
                     f"there are {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: linen's logical constraints need them (Explicit is the default in new jax).
  return jax.make_mesh(shape, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_shardings(abstract_tree: Any, mesh: jax.sharding.Mesh,
                      rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """NamedShardings for a (possibly boxed, abstract) pytree: boxed leaves follow their logical
  names, everything else is replicated. The result matches the UNBOXED tree."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict:
  """Assembles this process's slice of the batch into global arrays sharded over the batch."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def gather_params(params: Any, mesh: jax.sharding.Mesh) -> Any:
  """`params` (any pytree sharded over `mesh`, which may span processes) as numpy arrays on
  process 0, None on the others. A collective: every process must call it."""
  replicated_params = jax.jit(lambda p: p, out_shardings=replicated(mesh))(params)
  if jax.process_index() != 0:
    return None
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), replicated_params)
