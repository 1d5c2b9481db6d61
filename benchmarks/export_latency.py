"""Latency of the deployment exports (`segvit_jax.export`) against our JAX model, batch 1, the
whole-image forward pass from uint8 images to per-class scores, random weights, one run:

  python benchmarks/export_latency.py [--models segformer_b0,segvit_b16] [--full]
      [--repeats 10] [--threads N]

Columns: ours (the jitted JAX function the exports are made from), the StableHLO artifact
deserialised and called (`jax.export`), the ONNX model under onnxruntime's CPU provider
(all graph optimisations, `--threads` intra-op threads; default: onnxruntime's), the ratio
onnxruntime / ours, the export times and the max abs difference of the scores (onnxruntime vs
ours). Sizes: the configs' crops (`--full`: 512) or half of them (default, for a CPU). Times are
medians over `--repeats` calls after one untimed call, the three alternating so that load on
the machine hits them alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from segvit_jax import config_utils, export  # noqa: E402
from segvit_jax.tools.benchmark import random_bundle  # noqa: E402

MODELS = {
    "segformer_b0": "configs/segformer_b0_ade20k.py",
    "segvit_b16": "configs/segvit_vit_b16_ade20k.py",
}


def _median_ms(times: list[float]) -> float:
  return 1000 * statistics.median(times)


def bench(name: str, size: int, repeats: int, threads: int | None) -> dict:
  """One model's row: latencies (ms), export times (s) and the scores' max abs difference."""
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top

  c = config_utils.load_config(MODELS[name])
  c.model.dtype = "float32"
  b = random_bundle(c)
  sig = export.Signature(size, size)
  images = np.random.default_rng(0).integers(0, 256, (1, size, size, 3)).astype(np.uint8)
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    onnx_path, = export.export(b, os.path.join(tmp, "m.onnx"), "onnx", height=size,
                               width=size)
    onnx_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    shlo_path = export.export(b, os.path.join(tmp, "m.stablehlo"), "stablehlo", height=size,
                              width=size, platforms=("cpu",))[0]
    shlo_s = time.perf_counter() - t0
    options = ort.SessionOptions()
    if threads:
      options.intra_op_num_threads = threads
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    exp = jax.export.deserialize(open(shlo_path, "rb").read())
  ours_fn = jax.jit(export.forward_fn(b, sig))
  calls = {
      "ours": lambda: jax.block_until_ready(ours_fn(images)),
      "stablehlo": lambda: jax.block_until_ready(exp.call(images)),
      "onnxruntime": lambda: session.run(None, {"images": images}),
  }
  first = {k: f() for k, f in calls.items()}  # untimed: compiles / initialises
  diff = float(np.abs(np.asarray(first["onnxruntime"][0]) - np.asarray(first["ours"][0])).max())
  times = {k: [] for k in calls}
  for _ in range(repeats):
    for k, f in calls.items():
      t0 = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t0)
  ms = {k: _median_ms(v) for k, v in times.items()}
  return dict(model=name, size=size, **{f"{k}_ms": v for k, v in ms.items()},
              ratio=ms["onnxruntime"] / ms["ours"], onnx_export_s=onnx_s,
              stablehlo_export_s=shlo_s, max_diff=diff)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--full", action="store_true", help="512 px instead of 256")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
  args = p.parse_args(argv)
  size = 512 if args.full else 256
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, batch 1, {size}x{size}, "
        f"float32, median of {args.repeats}")
  print("| model | size | ours (JAX) ms | StableHLO ms | onnxruntime ms | onnxruntime / ours "
        "| ONNX export s | StableHLO export s | max abs diff |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name in args.models.split(","):
    r = bench(name, size, args.repeats, args.threads)
    print(f"| {r['model']} | {r['size']} | {r['ours_ms']:.1f} | {r['stablehlo_ms']:.1f} | "
          f"{r['onnxruntime_ms']:.1f} | {r['ratio']:.2f} | {r['onnx_export_s']:.1f} | "
          f"{r['stablehlo_export_s']:.1f} | {r['max_diff']:.1e} |", flush=True)


if __name__ == "__main__":
  main()
