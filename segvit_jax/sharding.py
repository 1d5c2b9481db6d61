"""Device mesh and logical-axis sharding (Flax lm1b / MaxText style).

Mesh axes: `data` (batch), `fsdp` (batch and parameter shards), `tensor` (heads / MLP).
Parameters and activations carry logical axis names (see `segvit_jax.models.layers`); the
rules below map them to mesh axes. With `fsdp = tensor = 1` this is plain data parallelism.

Several processes (hosts): `distributed_args` decides how `train.py` calls
`jax.distributed.initialize`, before anything else touches jax.
"""

from __future__ import annotations

import os
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


def distributed_args(flags: Mapping[str, Any], environ: Mapping[str, str]
                     ) -> dict[str, Any] | None:
  """Keyword arguments for `jax.distributed.initialize`, or None for a single process.

  `flags`: `coordinator_address`, `num_processes`, `process_id` (None when not given).
  In this order:
    1. Explicit: any of the three flags given -> all three are required, and passed on
       (bare multi-host GPU, or a launcher jax does not know).
    2. Automatic, `{}` (jax's cluster detection fills in everything) when `environ` says this
       is one process of several:
       - a multi-host TPU slice on GKE: `TPU_WORKER_HOSTNAMES` (or `TPU_PROCESS_ADDRESSES`)
         lists more than one host;
       - a TPU multislice: `MEGASCALE_COORDINATOR_ADDRESS` is set;
       - SLURM: `SLURM_NTASKS` > 1 and `SLURM_PROCID` set (an `srun` task; a bare `salloc`
         shell has no SLURM_PROCID). jax reads the coordinator from SLURM_STEP_NODELIST.
    3. Otherwise None: one process. A Cloud TPU VM pod slice started with
       `gcloud ... ssh --worker=all` needs no call (the TPU runtime forms the slice from the
       VM metadata); pass the flags there to force one.
  """
  explicit = {k: flags.get(k) for k in ("coordinator_address", "num_processes", "process_id")}
  given = {k: v for k, v in explicit.items() if v is not None}
  if given:
    missing = sorted(set(explicit) - set(given))
    if missing:
      raise ValueError(f"--{', --'.join(sorted(given))} given without --{', --'.join(missing)}: "
                       "a multi-process run needs all of --coordinator_address, "
                       "--num_processes and --process_id")
    if not 0 <= explicit["process_id"] < explicit["num_processes"]:
      raise ValueError(f"--process_id={explicit['process_id']} is not in "
                       f"[0, --num_processes={explicit['num_processes']})")
    return explicit
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return {}
  if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return {}
  try:
    slurm_tasks = int(environ.get("SLURM_NTASKS", "1"))
  except ValueError:
    slurm_tasks = 1
  if slurm_tasks > 1 and "SLURM_PROCID" in environ:
    return {}
  return None


def define_distributed_flags() -> tuple:
  """--coordinator_address / --num_processes / --process_id, for train.py and eval.py."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  return (
      flags.DEFINE_string(
          "coordinator_address", None, "host:port of process 0, for a multi-process run that "
          "jax does not detect by itself (with --num_processes and --process_id)."),
      flags.DEFINE_integer("num_processes", None, "Processes in the run."),
      flags.DEFINE_integer("process_id", None, "This process's index, 0-based."),
  )


DEFAULT_COMPILATION_CACHE = "~/.cache/segvit_jax/xla"


def default_compilation_cache() -> str:
  """$JAX_COMPILATION_CACHE_DIR if set, else DEFAULT_COMPILATION_CACHE."""
  return os.environ.get("JAX_COMPILATION_CACHE_DIR", DEFAULT_COMPILATION_CACHE)


def define_cache_flag():
  """--compilation_cache, for train.py and eval.py."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  return flags.DEFINE_string(
      "compilation_cache", default_compilation_cache(),
      "Directory of jax's persistent compilation cache: a rerun with the same shapes (a resumed "
      "training run, eval of each checkpoint) loads its programs instead of compiling them. "
      "'' turns it off. Default: $JAX_COMPILATION_CACHE_DIR, else " + DEFAULT_COMPILATION_CACHE)


def enable_compilation_cache(path: str | None) -> None:
  """Points jax's persistent compilation cache at `path` (programs that took >= 1 s to
  compile are kept); None or '' leaves it off."""
  if path:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))


def initialize_distributed(flag_holders: tuple, environ: Mapping[str, str]) -> bool:
  """Calls `jax.distributed.initialize` when `distributed_args` says this is one process of
  several (before anything else touches jax); exits with the reason on inconsistent flags.
  Then logs at INFO on process 0 and at WARNING on the others. Returns whether it initialised."""
  import sys  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  names = ("coordinator_address", "num_processes", "process_id")
  try:
    args = distributed_args({n: h.value for n, h in zip(names, flag_holders)}, environ)
  except ValueError as e:
    sys.exit(f"error: {e}")
  if args is not None:
    jax.distributed.initialize(**args)
  logging.set_verbosity(logging.INFO if jax.process_index() == 0 else logging.WARNING)
  if args is None:
    return False
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
