"""Writes a model bundle from a training workdir (parameters only, no optimizer state).

  python -m segvit_jax.export_bundle --workdir runs/demo --output runs/demo/bundle [--step N]
"""

from absl import app, flags

from segvit_jax import bundle

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
_OUTPUT = flags.DEFINE_string("output", None, "Bundle directory to write.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
  del argv
  b = bundle.load_model(_WORKDIR.value, step=_STEP.value)
  cfg = b.config
  extra = {"categories": cfg.categories} if cfg.get("categories") else {}
  path = bundle.save_bundle(_OUTPUT.value, b.variables["params"], cfg.model, mean=cfg.mean,
                            std=cfg.std, class_names=cfg.class_names, step=cfg.step,
                            source=cfg.source,
                            model_state={k: v for k, v in b.variables.items() if k != "params"},
                            **extra)
  print(f"wrote bundle {path} (step {cfg.step})")


if __name__ == "__main__":
  app.run(main)
