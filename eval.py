"""Evaluates a model at the papers' test protocols: mIoU, mAcc, aAcc and per-class IoU/Acc,
printed as a table and written to `eval_results.json` (with the protocol), side-by-side pictures
of the first examples and a confusion-matrix picture. With `config.eval.task` "panoptic" (or
"instance"), a mask-classification model's PQ / SQ / RQ (All, Things, Stuff, per class) and
COCO mask AP (or AP alone) at EoMT's panoptic / instance protocol instead.

  python eval.py --config configs/demo.py --workdir runs/demo        # latest checkpoint there
  python eval.py --workdir runs/demo          # the same, with the config the run saved there
  python eval.py --config configs/demo.py --checkpoint runs/demo/bundle   # a bundle or workdir
  python eval.py --config configs/segvit_vit_b16_ade20k.py --checkpoint BUNDLE \
      --scales 0.5,0.75,1.0,1.25,1.5,1.75 --flip --config.dataset.root=/data/ADEChallengeData2016
  python eval.py --config configs/eomt_vit_l_coco_panoptic.py --checkpoint BUNDLE \
      --config.dataset.root=/data/coco                                  # PQ and AP

The config supplies the dataset and the test protocol (`config.eval`: resize policy, windows,
scales, flip; see segvit_jax/evaluation/semantic.py); the model comes from the checkpoint (its own
config) with its own input statistics (mean / std: a config's differing ones are a warning
that names both), so a bundle evaluates under any compatible data config. Without --config,
the config.json that train.py saved in the workdir (--workdir, or a workdir as --checkpoint) is
the config: the run's own dataset and protocol. eval_results.json records what was evaluated:
the checkpoint, its step, the config file and the whole config. Several processes (hosts)
split the images: `--coordinator_address/--num_processes/--process_id` as for train.py.
"""

import os
import sys

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from segvit_jax import bundle, checkpoint, runtime
from segvit_jax.evaluation import evaluate, inference, metrics

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/NAME.py[:ARG]); default: the config.json a training "
    "run saved in --workdir (or in --checkpoint, when that is a workdir).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir: evaluates its latest "
                               "checkpoint and writes results there.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A model bundle or a training workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: latest).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write results (default: the workdir, "
                              "else the checkpoint directory).")
_SPLIT = flags.DEFINE_string("split", None, "Dataset split (default: config.dataset.eval_split).")
_NUM_VIS = flags.DEFINE_integer("num_vis", None, "Side-by-side pictures (image | ground truth | "
                                "prediction | overlay) of the first N examples, and "
                                "confusion.png; 0: none (default: config.eval.num_pictures).")
flags.DEFINE_alias("num-vis", "num_vis")
_SCALES = flags.DEFINE_list("scales", None, "Multi-scale test ratios, e.g. 0.5,0.75,1.0,1.25,"
                            "1.5,1.75 (default: config.eval.scales).")
_FLIP = flags.DEFINE_bool("flip", None, "Also predict the mirrored images (default: "
                          "config.eval.flip).")
runtime.define_distributed_flags()
runtime.define_compilation_cache_flag()


def workdir_config(workdir: str | None, checkpoint_path: str | None
                   ) -> tuple[ml_collections.ConfigDict, str]:
  """(config, its file) without --config: the config.json of the training workdir given
  (--workdir, else --checkpoint when it is a workdir rather than a bundle), which train.py
  wrote with every key the run used. A usage error naming what to pass otherwise."""
  for path in (workdir, checkpoint_path):
    if path and not bundle.is_bundle(path) and os.path.isfile(
        os.path.join(path, checkpoint.RUN_CONFIG)):
      saved = bundle.read_config(path)
      if "model" in saved and "dataset" in saved:
        return ml_collections.ConfigDict(saved), os.path.join(path, checkpoint.RUN_CONFIG)
  given = workdir or checkpoint_path
  raise app.UsageError(
      f"give --config: {given} holds no training config.json (a workdir of train.py has one; "
      "a bundle's config describes the model only, not the dataset to evaluate on)")


def main(argv: list[str]) -> None:
  runtime.no_arguments(argv)
  path = _CHECKPOINT.value or _WORKDIR.value
  if not path:
    raise app.UsageError("give --workdir or --checkpoint")
  if _CONFIG.value is None:
    config, config_file = workdir_config(_WORKDIR.value, _CHECKPOINT.value)
  else:
    config = _CONFIG.value
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  scales = inference.check_ratios(_SCALES.value, "--scales") if _SCALES.value else None
  model = checkpoint.load_model(path, step=_STEP.value)
  if model.config.model.num_classes != config.model.num_classes:
    raise ValueError(f"{path} has {model.config.model.num_classes} classes but the config's "
                     f"dataset has {config.model.num_classes}")
  with config.unlocked():
    config.model = model.config.model
    # The model's own input statistics win: a config's differing ones would be wrong numbers.
    for key in ("mean", "std"):
      theirs, ours = tuple(model.config[key]), tuple(config[key])
      if not np.allclose(theirs, ours):
        logging.warning("config.%s=%s differs from %s's %s=%s: using the model's", key, ours,
                        path, key, theirs)
      config[key] = theirs
    if scales:
      config.eval.scales = scales
    if _FLIP.value is not None:
      config.eval.flip = _FLIP.value
  out_dir = _OUTPUT.value or (_WORKDIR.value or path)
  os.makedirs(out_dir, exist_ok=True)
  evaluated = {"checkpoint": os.path.abspath(path),
               "kind": "bundle" if bundle.is_bundle(path) else "workdir",
               "step": model.config.get("step"),
               "config_file": config_file,
               "config": config.to_dict()}
  results = evaluate(model.model, model.variables, config, split=_SPLIT.value,
                     out_dir=out_dir, num_pictures=num_pictures(config), progress=True,
                     evaluated=evaluated)
  if jax.process_index() == 0:
    print(metrics.format_table(results))
    print(f"results written to {os.path.join(out_dir, 'eval_results.json')}")


def num_pictures(config: ml_collections.ConfigDict) -> int:
  """--num_vis, else the config's `eval.num_pictures` (what training's evaluations draw; 4, the
  configs' default, for a config saved before that key existed)."""
  if _NUM_VIS.value is not None:
    return _NUM_VIS.value
  return int(config.eval.get("num_pictures", 4))


if __name__ == "__main__":
  sys.exit(runtime.run(main))
