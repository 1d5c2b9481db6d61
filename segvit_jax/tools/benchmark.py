"""Inference speed on this machine: frames per second and latency (mean, p50, p90 in ms) of a
model bundle or training workdir (`--checkpoint`), or of a config with random weights
(`--config`), through `Bundle.predict` under the test protocol the bundle / config records
(resize, sliding windows, scales, flips), as mmsegmentation's `tools/benchmark.py` times its
test pipeline's model part.

  python -m segvit_jax.tools.benchmark --checkpoint runs/demo/bundle
  python -m segvit_jax.tools.benchmark --config configs/segvit_vit_b16_ade20k.py --size 512x683

Each call predicts `--batch` random uint8 images of `--size` (default: config.eval.crop_size,
the window the protocol runs the model on) and waits for the scores on the host; `--warmup`
calls (the first compiles) are not timed. FPS = batch / mean latency.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from segvit_jax import bundle as bundle_lib
from segvit_jax import checkpoint, runtime
from segvit_jax.flops import parse_size
from segvit_jax.models import build_model

COLUMNS = ("model", "device", "protocol", "size", "batch", "iters", "mean ms", "p50 ms",
           "p90 ms", "FPS")


def define_flags() -> None:
  """The command line's flags (`runtime.run` defines them: importing this module defines none)."""
  flags.DEFINE_string("checkpoint", None, "Bundle directory or training workdir to time.")
  config_flags.DEFINE_config_file("config", None, "Or a config file (configs/NAME.py[:ARG]): "
                                  "its model with random weights.", lock_config=False)
  flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the latest).")
  flags.DEFINE_string("size", None, "Input HxW or a side (default: config.eval.crop_size).")
  flags.DEFINE_integer("batch", 1, "Images per call.")
  flags.DEFINE_integer("warmup", 3, "Untimed calls first (the first compiles).")
  flags.DEFINE_integer("iters", 20, "Timed calls.")
  flags.DEFINE_enum("protocol", "model", bundle_lib.PROTOCOLS,
                    "model: the recorded test protocol; whole: one whole-image pass.")
  flags.DEFINE_string("json", None, "Also write the result as JSON to this file.")
  runtime.define_compilation_cache_flag()


def random_bundle(config: ml_collections.ConfigDict, seed: int = 0) -> bundle_lib.Bundle:
  """A `Bundle` of `config`'s model with freshly initialised weights (the config's test
  protocol, mean and std)."""
  model = build_model(config.model)
  x = bundle_lib.probe_input(config.model)
  variables = jax.jit(lambda: model.init(jax.random.key(seed), x))()
  return bundle_lib.Bundle(model=model, variables=nn.meta.unbox(variables), config=config)


def default_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """config.eval.crop_size, else config.augment.crop_size."""
  for part in ("eval", "augment"):
    size = config.get(part, {}).get("crop_size")
    if size:
      return tuple(int(s) for s in size)
  raise ValueError("the config records no eval.crop_size or augment.crop_size: give --size")


def time_predict(b: bundle_lib.Bundle, size: Sequence[int], batch: int = 1, iters: int = 20,
                 warmup: int = 3, protocol: str = "model", seed: int = 0) -> np.ndarray:
  """Seconds of each of `iters` timed `b.predict` calls on `batch` random uint8 images of
  `size` (H, W), after `warmup` untimed ones."""
  if iters < 1 or warmup < 0 or batch < 1:
    raise app.UsageError(f"--iters={iters}, --warmup={warmup}, --batch={batch}: expected "
                         "iters >= 1, warmup >= 0, batch >= 1")
  images = np.random.default_rng(seed).integers(0, 256, (batch, *size, 3), dtype=np.uint8)
  for _ in range(warmup):
    b.predict(images, protocol)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    b.predict(images, protocol)  # numpy scores: the call has finished on the device
    times.append(time.perf_counter() - t0)
  return np.asarray(times)


def summary(times: np.ndarray, *, model: str, protocol: str, size: Sequence[int],
            batch: int) -> dict[str, Any]:
  """The table row of `time_predict`'s seconds: latency in ms (mean, p50, p90) and FPS."""
  ms = 1e3 * np.asarray(times, np.float64)
  mean = float(ms.mean())
  return {"model": model, "device": jax.devices()[0].device_kind, "protocol": protocol,
          "size": f"{size[0]}x{size[1]}", "batch": batch, "iters": len(ms),
          "mean ms": mean, "p50 ms": float(np.percentile(ms, 50)),
          "p90 ms": float(np.percentile(ms, 90)), "FPS": 1e3 * batch / mean}


def format_table(row: dict[str, Any]) -> str:
  """A header line and one row of COLUMNS, numbers to 2 decimals."""
  cells = [f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
  widths = [max(len(c), len(v)) for c, v in zip(COLUMNS, cells)]
  line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths))  # noqa: E731
  return f"{line(COLUMNS)}\n{line(cells)}"


def model_name(config: ml_collections.ConfigDict) -> str:
  m = config.model
  return f"{m.get('name', 'segvit')} {m.get('backbone', {}).get('variant', '')}".strip()


def load(checkpoint_path: str | None, config: ml_collections.ConfigDict | None,
         step: int | None) -> bundle_lib.Bundle:
  """The bundle to time: exactly one of a checkpoint and a config."""
  if (checkpoint_path is None) == (config is None):
    raise app.UsageError("give exactly one of --checkpoint (a bundle or workdir) and --config")
  if checkpoint_path is not None:
    if not os.path.exists(checkpoint_path):
      raise FileNotFoundError(f"--checkpoint {checkpoint_path} does not exist")
    return checkpoint.load_model(checkpoint_path, step=step)
  return random_bundle(config)


def benchmark(b: bundle_lib.Bundle, size: Sequence[int] | None = None, batch: int = 1,
              iters: int = 20, warmup: int = 3, protocol: str = "model") -> dict[str, Any]:
  """`summary` of timing `b` (size default: `default_size` of its config)."""
  size = tuple(size) if size else default_size(b.config)
  times = time_predict(b, size, batch, iters, warmup, protocol)
  return summary(times, model=model_name(b.config), protocol=protocol, size=size, batch=batch)


def write_json(row: dict[str, Any], path: str) -> None:
  """The result row as a JSON object (the table's column names as keys)."""
  with open(path, "w") as out:
    json.dump(row, out, indent=1)


def main(argv: list[str]) -> None:
  runtime.no_arguments(argv)
  f = flags.FLAGS
  b = load(f.checkpoint, f.config, f.step)
  size = parse_size(f.size) if f.size else None
  row = benchmark(b, size, f.batch, f.iters, f.warmup, f.protocol)
  print(format_table(row))
  if f.json:
    write_json(row, f.json)
    print(f"wrote {f.json}")


if __name__ == "__main__":
  sys.exit(runtime.run(main, define_flags=define_flags))
