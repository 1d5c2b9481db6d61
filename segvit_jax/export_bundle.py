"""Writes a model bundle from a training workdir (parameters only, no optimizer state).

  python -m segvit_jax.export_bundle --workdir runs/demo --output runs/demo/bundle [--step N]

An existing --output is left alone unless --overwrite; the bundle is written atomically (to a
temporary directory beside it, then moved in place), so a failed write keeps the old one.
"""

import sys

from absl import flags

from segvit_jax import bundle, checkpoint, runtime


def define_flags() -> None:
  """The command line's flags (`runtime.run` defines them: importing this module defines none)."""
  flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
  flags.DEFINE_string("output", None, "Bundle directory to write.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_bool("overwrite", False, "Replace --output if it exists.")
  flags.mark_flags_as_required(["workdir", "output"])


def main(argv: list[str]) -> None:
  runtime.no_arguments(argv)
  runtime.refuse_overwrite(flags.FLAGS.output, flags.FLAGS.overwrite)
  b = checkpoint.load_model(flags.FLAGS.workdir, step=flags.FLAGS.step)
  cfg = b.config
  extra = {key: cfg[key] for key in ("categories", "eval") if cfg.get(key)}
  path = bundle.save_bundle(flags.FLAGS.output, b.variables["params"], cfg.model, mean=cfg.mean,
                            std=cfg.std, class_names=cfg.class_names, step=cfg.step,
                            source=cfg.source,
                            model_state={k: v for k, v in b.variables.items() if k != "params"},
                            **extra)
  print(f"wrote bundle {path} (step {cfg.step})")


if __name__ == "__main__":
  sys.exit(runtime.run(main, define_flags=define_flags))
