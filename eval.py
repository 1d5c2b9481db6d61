"""Evaluates a model: mIoU, mAcc, aAcc and per-class IoU/Acc, printed as a table and written to
`eval_results.json`, with overlay pictures of the first examples.

  python eval.py --config configs/demo.py --workdir runs/demo        # latest checkpoint there
  python eval.py --config configs/demo.py --checkpoint runs/demo/bundle   # a bundle or workdir
  python eval.py --config configs/segvit_vit_l16_ade20k.py --checkpoint CKPT \
      --config.dataset.root=/data/ADEChallengeData2016 --config.eval.mode=slide

The config supplies the dataset and the test settings (`config.eval`); the model comes from
the checkpoint (its own config), so a bundle evaluates under any compatible data config.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from segvit_jax import bundle as bundle_lib
from segvit_jax import config_utils, evaluate, metrics, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir: evaluates its latest "
                               "checkpoint and writes results there.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A model bundle or a training workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: latest).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write results (default: the workdir, "
                              "else the checkpoint directory).")
_SPLIT = flags.DEFINE_string("split", None, "Dataset split (default: config.dataset.eval_split).")
_PICTURES = flags.DEFINE_integer("pictures", 8, "Overlay pictures of the first N examples.")
flags.mark_flag_as_required("config")


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  trainer.quiet_library_logs()
  path = _CHECKPOINT.value or _WORKDIR.value
  if not path:
    raise app.UsageError("give --workdir or --checkpoint")
  config = _CONFIG.value
  model = bundle_lib.load_model(path, step=_STEP.value)
  if model.config.model.num_classes != config.model.num_classes:
    raise ValueError(f"{path} has {model.config.model.num_classes} classes but the config's "
                     f"dataset has {config.model.num_classes}")
  with config.unlocked():
    config.model = model.config.model
  out_dir = _OUTPUT.value or (_WORKDIR.value or path)
  os.makedirs(out_dir, exist_ok=True)
  results = evaluate.evaluate_params(model.model, model.variables["params"], config,
                                     split=_SPLIT.value, out_dir=out_dir,
                                     num_pictures=_PICTURES.value, progress=True)
  print(metrics.format_table(results))
  print(f"results written to {os.path.join(out_dir, 'eval_results.json')}")


if __name__ == "__main__":
  app.run(main, flags_parser=config_utils.parse_flags)
