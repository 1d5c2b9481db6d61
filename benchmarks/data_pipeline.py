"""Throughput of the SegViT ADE20K train pipeline (decode JPEG + PNG, mmseg augmentations at
512 crops, normalise, pad, batch) on fabricated full-size ADE20K files.

  python benchmarks/data_pipeline.py [--images 96] [--batches 20] [--workers 0,1,2]

Fabricates ~683x512 JPEGs (smooth colour fields with shapes and noise, so JPEG sizes and decode
cost are photo-like) and matching 8-bit label PNGs in the ADEChallengeData2016 layout, then
times `pipeline.make_train_iterator` with `configs/segvit_vit_b16_ade20k.py` for each worker
count in one run (side-by-side ratios; this machine is noisy). Prints images/s and images per
CPU-second (the figure that says how many cores feed an accelerator).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import segvit_vit_b16_ade20k  # noqa: E402
from segvit_jax.data import pipeline  # noqa: E402


def fabricate(root: str, n: int, size=(512, 683), seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  h, w = size
  for split in ("training", "validation"):
    os.makedirs(os.path.join(root, "images", split), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations", split), exist_ok=True)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  for i in range(n):
    base = rng.uniform(0, 255, 3)
    grad = rng.uniform(-0.2, 0.2, (2, 3))
    img = base + yy[..., None] * grad[0] + xx[..., None] * grad[1]
    img = Image.fromarray(np.clip(img + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8))
    label = Image.new("L", (w, h), int(rng.integers(1, 151)))
    draw, ldraw = ImageDraw.Draw(img), ImageDraw.Draw(label)
    for _ in range(12):
      x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
      box = [int(x0), int(y0), int(x0 + rng.integers(30, 250)), int(y0 + rng.integers(30, 250))]
      cls = int(rng.integers(0, 151))
      colour = tuple(int(c) for c in rng.integers(0, 256, 3))
      (draw.ellipse if cls % 2 else draw.rectangle)(box, fill=colour)
      (ldraw.ellipse if cls % 2 else ldraw.rectangle)(box, fill=cls)
    name = f"ADE_train_{i + 1:08d}"
    img.save(os.path.join(root, "images", "training", name + ".jpg"), quality=90)
    label.save(os.path.join(root, "annotations", "training", name + ".png"))


def measure(root: str, workers: int, batches: int, batch_size: int) -> tuple[float, float]:
  """(images/s wall, images per CPU-second). CPU time is this process (all its threads) plus
  the worker processes over their whole life (start-up and the untimed first batch included,
  so the per-CPU figure is a lower bound)."""
  c = segvit_vit_b16_ade20k.get_config()
  c.dataset.root = root
  c.dataset.num_workers = workers
  c.batch_size = batch_size
  children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
  it = pipeline.make_train_iterator(c, process_index=0, process_count=1)
  try:
    next(it)  # start-up (worker processes, first decode) is not throughput
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
      next(it)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
  finally:
    if hasattr(it, "close"):
      it.close()
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu += (children.ru_utime - children0.ru_utime) + (children.ru_stime - children0.ru_stime)
  n = batches * batch_size
  return n / wall, n / cpu


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=96)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--workers", default="0,1,2")
  args = parser.parse_args()
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, "ADEChallengeData2016")
    fabricate(root, args.images)
    sizes = [os.path.getsize(os.path.join(root, "images", "training", f))
             for f in os.listdir(os.path.join(root, "images", "training"))]
    print(f"{args.images} fabricated 683x512 JPEGs, mean {np.mean(sizes) / 1024:.0f} KiB; "
          f"{os.cpu_count()} CPUs; batch {args.batch_size}, {args.batches} batches timed")
    print("| workers | images/s | images per CPU-second | images/s per worker |")
    print("|---|---|---|---|")
    for workers in (int(w) for w in args.workers.split(",")):
      rate, per_cpu = measure(root, workers, args.batches, args.batch_size)
      label = "0 (in-process, 2 reader threads)" if workers == 0 else str(workers)
      print(f"| {label} | {rate:.1f} | {per_cpu:.1f} | {rate / max(workers, 1):.1f} |",
            flush=True)


if __name__ == "__main__":
  main()
