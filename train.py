"""Trains a segmentation model.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/segvit_vit_l16_ade20k.py --workdir runs/l16 \
      --config.dataset.root=/data/ADEChallengeData2016 --config.batch_size=16

Rerunning the same command with the same workdir resumes from the latest checkpoint, also with
another number of processes or another mesh (the data order then restarts).
`--config.key=value` overrides any config entry; an unknown key is an error.

Several hosts: run the same command on every host. On a multi-host TPU slice (GKE, multislice)
or as `srun` tasks under SLURM the processes find each other by themselves; elsewhere (bare
multi-host GPU) add `--coordinator_address=HOST0:PORT --num_processes=N --process_id=I`.
`segvit_jax.sharding.distributed_args` documents exactly what triggers which. Only process 0
logs below WARNING and writes metrics; `config.batch_size` stays the global batch.
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from segvit_jax import config_utils, evaluate, sharding, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a multi-process run that jax "
    "does not detect by itself (with --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # Before anything else touches jax: initialize() must precede the first backend use.
  try:
    args = sharding.distributed_args(
        {"coordinator_address": _COORDINATOR.value, "num_processes": _NUM_PROCESSES.value,
         "process_id": _PROCESS_ID.value}, os.environ)
  except ValueError as e:
    sys.exit(f"error: {e}")
  if args is not None:
    jax.distributed.initialize(**args)
  logging.set_verbosity(logging.INFO if jax.process_index() == 0 else logging.WARNING)
  trainer.quiet_library_logs()
  if args is not None:
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
  trainer.train(_CONFIG.value, _WORKDIR.value, evaluate_fn=evaluate.evaluate_params)


if __name__ == "__main__":
  app.run(main, flags_parser=config_utils.parse_flags)
