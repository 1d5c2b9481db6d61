"""Trains a segmentation model.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/segvit_vit_l16_ade20k.py --workdir runs/l16 \
      --config.dataset.root=/data/ADEChallengeData2016 --config.batch_size=16

Rerunning the same command with the same workdir resumes from the latest checkpoint.
`--config.key=value` overrides any config entry; an unknown key is an error.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from segvit_jax import config_utils, evaluate, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  trainer.quiet_library_logs()
  trainer.train(_CONFIG.value, _WORKDIR.value, evaluate_fn=evaluate.evaluate_params)


if __name__ == "__main__":
  app.run(main, flags_parser=config_utils.parse_flags)
