"""Latency of the deployment exports (`segvit_jax.export`) against our JAX model, batch 1, the
whole-image forward pass from uint8 images to per-class scores, random weights, one run:

  python benchmarks/export_latency.py [--models segformer_b0,segvit_b16] [--full]
      [--repeats 10] [--threads N]

Columns: ours (the jitted JAX function the exports are made from), the StableHLO artifact
deserialised and called (`jax.export`), the ONNX model under onnxruntime's CPU provider
(all graph optimisations, `--threads` intra-op threads; default: onnxruntime's), the PyTorch
model with the same weights (SegFormer: transformers' `SegformerForSemanticSegmentation` from
our `--to hf-segformer` export; SegViT: `segvit_jax.torch` from the bundle; eager, no_grad,
the same normalise and bilinear resize of the scores to the input), the ratio onnxruntime /
ours, the export times and the max abs differences of the scores (onnxruntime vs ours,
PyTorch vs ours). Sizes: the configs' crops (`--full`: 512) or half of them (default, for a CPU). Times are
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

from segvit_jax import bundle as bundle_lib, config_utils, convert, export  # noqa: E402
from segvit_jax.tools.benchmark import random_bundle  # noqa: E402

MODELS = {
    "segformer_b0": "configs/segformer_b0_ade20k.py",
    "segvit_b16": "configs/segvit_vit_b16_ade20k.py",
}


def _median_ms(times: list[float]) -> float:
  return 1000 * statistics.median(times)


def torch_forward(name: str, b: bundle_lib.Bundle, tmp: str, size: int):
  """images (1, size, size, 3) uint8 -> scores (1, C, size, size) of the PyTorch model with
  `b`'s weights (module docstring), as a numpy-returning callable."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  torch.set_grad_enabled(False)
  c = b.config
  path = bundle_lib.save_bundle(
      os.path.join(tmp, "bundle"), b.variables["params"], c.model, mean=c.mean, std=c.std,
      class_names=[f"c{i}" for i in range(c.model.num_classes)],
      model_state={k: v for k, v in b.variables.items() if k != "params"})
  if name.startswith("segformer"):
    import transformers  # pylint: disable=g-import-not-at-top
    convert.export(path, os.path.join(tmp, "hf"), "hf-segformer")
    model = transformers.SegformerForSemanticSegmentation.from_pretrained(
        os.path.join(tmp, "hf")).eval()
    scores = lambda x: model(pixel_values=x).logits
  else:
    import segvit_jax.torch as segvit_torch  # pylint: disable=g-import-not-at-top
    model = segvit_torch.from_bundle(path).eval()
    scores = lambda x: model(x)["semantic_scores"]
  mean = torch.tensor(c.mean, dtype=torch.float32).view(1, 3, 1, 1)
  std = torch.tensor(c.std, dtype=torch.float32).view(1, 3, 1, 1)

  def run(images: np.ndarray) -> np.ndarray:
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - mean) / std
    return F.interpolate(scores(x), size=(size, size), mode="bilinear",
                         align_corners=False).numpy()

  return run


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
    torch_fn = torch_forward(name, b, tmp, size)
  ours_fn = jax.jit(export.forward_fn(b, sig))
  calls = {
      "ours": lambda: jax.block_until_ready(ours_fn(images)),
      "stablehlo": lambda: jax.block_until_ready(exp.call(images)),
      "onnxruntime": lambda: session.run(None, {"images": images}),
      "pytorch": lambda: torch_fn(images),
  }
  first = {k: f() for k, f in calls.items()}  # untimed: compiles / initialises
  ours = np.asarray(first["ours"][0])
  diff = float(np.abs(np.asarray(first["onnxruntime"][0]) - ours).max())
  torch_diff = float(np.abs(first["pytorch"] - ours).max())
  times = {k: [] for k in calls}
  for _ in range(repeats):
    for k, f in calls.items():
      t0 = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t0)
  ms = {k: _median_ms(v) for k, v in times.items()}
  return dict(model=name, size=size, **{f"{k}_ms": v for k, v in ms.items()},
              ratio=ms["onnxruntime"] / ms["ours"], onnx_export_s=onnx_s,
              stablehlo_export_s=shlo_s, max_diff=diff, torch_diff=torch_diff)


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
  print("| model | size | ours (JAX) ms | StableHLO ms | onnxruntime ms | PyTorch ms "
        "| onnxruntime / ours | PyTorch / ours | ONNX export s | StableHLO export s "
        "| max abs diff onnxruntime | max abs diff PyTorch |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for name in args.models.split(","):
    r = bench(name, size, args.repeats, args.threads)
    print(f"| {r['model']} | {r['size']} | {r['ours_ms']:.1f} | {r['stablehlo_ms']:.1f} | "
          f"{r['onnxruntime_ms']:.1f} | {r['pytorch_ms']:.1f} | {r['ratio']:.2f} | "
          f"{r['pytorch_ms'] / r['ours_ms']:.2f} | {r['onnx_export_s']:.1f} | "
          f"{r['stablehlo_export_s']:.1f} | {r['max_diff']:.1e} | {r['torch_diff']:.1e} |",
          flush=True)


if __name__ == "__main__":
  main()
