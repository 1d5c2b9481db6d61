"""Predicts segmentation maps for images with a model bundle or a training workdir.

  python predict.py --checkpoint runs/demo/bundle --input photo.jpg --output out/
  python predict.py --checkpoint runs/demo --input images/ --output out/ --save-scores

Per image NAME: `NAME.png` (class ids, uint8 or uint16), `NAME_overlay.jpg` (colour overlay)
and, with --save-scores, `NAME.npy`: per-class scores (C, H, W) float32 at the input resolution.
The whole image is processed at its own resolution with the model's own normalisation.
"""

import argparse
import os
import sys
import time

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(path: str) -> list[str]:
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
    return files
  if not os.path.isfile(path):
    raise FileNotFoundError(f"input {path} does not exist")
  return [path]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="model bundle or training workdir")
  parser.add_argument("--input", required=True, help="an image file or a directory of images")
  parser.add_argument("--output", required=True, help="output directory")
  parser.add_argument("--save-scores", action="store_true", help="also write NAME.npy scores")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step of a workdir")
  args = parser.parse_args(argv)

  from segvit_jax import bundle as bundle_lib  # pylint: disable=g-import-not-at-top
  from segvit_jax import visualize  # pylint: disable=g-import-not-at-top
  from segvit_jax.data import sources  # pylint: disable=g-import-not-at-top

  files = list_images(args.input)
  model = bundle_lib.load_model(args.checkpoint, step=args.step)
  num_classes = model.config.model.num_classes
  os.makedirs(args.output, exist_ok=True)
  t0 = time.perf_counter()
  for i, file in enumerate(files):
    image = sources.read_image(file)
    scores = model.predict(image[None])[0]  # (C, H, W)
    pred = scores.argmax(0).astype(np.uint8 if num_classes <= 256 else np.uint16)
    name = os.path.splitext(os.path.basename(file))[0]
    Image.fromarray(pred).save(os.path.join(args.output, f"{name}.png"))
    visualize.save(os.path.join(args.output, f"{name}_overlay.jpg"),
                   visualize.overlay(image, pred, num_classes))
    if args.save_scores:
      np.save(os.path.join(args.output, f"{name}.npy"), scores.astype(np.float32))
    rate = (i + 1) / (time.perf_counter() - t0)
    print(f"[{i + 1}/{len(files)}] {file} -> {name}.png ({rate:.2f} img/s)", flush=True)
  print(f"wrote {len(files)} predictions to {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
