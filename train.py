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
`segvit_jax.runtime.distributed_args` documents exactly what triggers which. Only process 0
logs below WARNING and writes metrics; `config.batch_size` stays the global batch.
"""

import sys

from absl import flags
from ml_collections import config_flags

from segvit_jax import runtime, trainer
from segvit_jax.evaluation import evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
runtime.define_distributed_flags()
runtime.define_compilation_cache_flag()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  runtime.no_arguments(argv)
  trainer.train(_CONFIG.value, _WORKDIR.value, evaluate_fn=evaluate)


if __name__ == "__main__":
  sys.exit(runtime.run(main))
