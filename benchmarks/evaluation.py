"""Evaluation throughput of SegViT ViT-B/16 (configs/segvit_vit_b16_ade20k.py, random weights)
on fabricated ADE20K-like images: single-scale against 6-scale + flip, side by side in one run.

  python benchmarks/evaluation.py [--images 3] [--full] [--window-batch 8]

Default (a 2-core CPU): images 256 x 341 with the protocol halved, test size keep-ratio
(1024, 256), slide crop 256 / stride 171: a quarter of the pixels of the paper's 512 x 683
images at (2048, 512), crop 512 / stride 341, and nearly their windows (per view over the 6
scales 1 + 1 + 2 + 4 + 6 + 9 = 23 here, 1 + 1 + 2 + 4 + 6 + 12 = 26 there). `--full`: the
paper's sizes (683 x 512 images, the config's protocol untouched), for an accelerator.

The loop is `segvit_jax.evaluation.semantic.evaluate`'s (read + test resize,
`MultiScalePredictor`, confusion matrices on device), timed per image: the first image compiles
every program (the model once per window shape and window batch, the glue once per buffer
size), so it is reported apart from the steady state (the others; all images have one size, so
nothing compiles after the first).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.data_pipeline import fabricate  # noqa: E402
from configs import segvit_vit_b16_ade20k  # noqa: E402
from segvit_jax.evaluation import inference, semantic  # noqa: E402
from segvit_jax.data import pipeline, transforms  # noqa: E402
from segvit_jax.models import build_model, input_padding  # noqa: E402

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def make_config(root: str, full: bool, scales, flip: bool, window_batch: int):
  c = segvit_vit_b16_ade20k.get_config()
  c.dataset.root = root
  c.eval.scales = tuple(scales)
  c.eval.flip = flip
  c.eval.window_batch = window_batch
  if not full:  # the protocol at half size
    c.eval.scale = (1024, 256)
    c.eval.crop_size = (256, 256)
    c.eval.stride = (171, 171)
  return c


def windows_per_image(c, height: int, width: int) -> list[int]:
  """Model windows per scale (both views when flipping) for an (height, width) image."""
  ev = c.eval
  counts = []
  for r in ev.scales:
    h, w = transforms.test_size(height, width, ev.resize, ev.scale, r, ev.size_divisor,
                                ev.min_size)
    _, starts = inference.window_layout(h, w, ev.mode, ev.crop_size, ev.stride,
                                       input_padding(c.model).multiple)
    counts.append(len(starts) * (2 if ev.flip else 1))
  return counts


def measure(c, model, params) -> list[float]:
  """Seconds per image of `semantic.evaluate`'s loop (`num_threads` 0: reading in this thread;
  it is ~1% of a step here)."""
  dataset, _ = pipeline.make_eval_dataset(c, "train")
  predictor = semantic.make_predictor(model, {"params": params}, c)
  times = []
  for i in range(len(dataset)):
    t0 = time.perf_counter()
    _, mats = semantic.score_image(predictor, dataset[i],
                                   ignore_index=int(c.dataset.ignore_index))
    np.asarray(mats)  # waits for the device
    times.append(time.perf_counter() - t0)
  return times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=3)
  parser.add_argument("--full", action="store_true", help="paper sizes (683x512, crop 512)")
  parser.add_argument("--window-batch", type=int, default=8)
  args = parser.parse_args()
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  size = (512, 683) if args.full else (256, 341)
  c0 = segvit_vit_b16_ade20k.get_config()
  model = build_model(c0.model)
  t0 = time.perf_counter()
  params = jax.jit(lambda: nn.meta.unbox(
      model.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)))["params"]))()
  params = jax.block_until_ready(params)
  init_s = time.perf_counter() - t0
  protocols = [("single-scale", (1.0,), False), ("6 scales + flip", SCALES, True)]
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, "ADEChallengeData2016")
    fabricate(root, args.images, size=size)
    print(f"SegViT ViT-B/16 (random init, {init_s:.0f} s), {args.images} fabricated "
          f"{size[0]}x{size[1]} images; {jax.devices()[0].device_kind} x "
          f"{jax.local_device_count()}, {os.cpu_count()} CPUs; window batch "
          f"{args.window_batch}")
    rows = []
    for name, scales, flip in protocols:
      c = make_config(root, args.full, scales, flip, args.window_batch)
      counts = windows_per_image(c, *size)
      times = measure(c, model, params)
      rest = times[1:]
      steady = sum(rest) / len(rest) if rest else float("nan")
      rows.append((name, c, counts, times[0], steady))
      print(f"{name}: windows per scale {counts}, seconds per image "
            f"{[round(t, 2) for t in times]}", flush=True)
    ev = rows[0][1].eval
    print(f"\ntest size keep-ratio {tuple(ev.scale)}, slide crop {tuple(ev.crop_size)} / "
          f"stride {tuple(ev.stride)}")
    print("| protocol | windows / image | first image, s (compile + run) | steady s / image "
          "| steady images/s | steady windows/s |")
    print("|---|---|---|---|---|---|")
    for name, _, counts, first, steady in rows:
      n = sum(counts)
      print(f"| {name} | {n} ({' + '.join(map(str, counts))}) | {first:.1f} | {steady:.2f} | "
            f"{1 / steady:.3f} | {n / steady:.2f} |")
    ratio = rows[1][4] / rows[0][4]
    print(f"\n6 scales + flip / single-scale, steady time per image: {ratio:.1f}x "
          f"(windows: {sum(rows[1][2]) / sum(rows[0][2]):.1f}x)")


if __name__ == "__main__":
  main()
