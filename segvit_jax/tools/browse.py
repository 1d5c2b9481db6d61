"""A grid of augmented training samples exactly as the training pipeline produces them
(`data.pipeline.make_train_iterator`: the config's crop, scale, flip and photometric
augmentation), each image beside its label map in the dataset's palette, to a PNG
(mmsegmentation's `tools/browse_dataset.py`).

  python -m segvit_jax.tools.browse --config configs/demo.py --num 8 --output browse.png

Images are de-normalised with config.mean / config.std; ignored pixels (padding, void) are
black in the label map; a legend below names the classes shown with their colours. Small
crops are enlarged (nearest) to at least --min_side pixels.
Panoptic datasets show each segment in its class's colour.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Mapping

import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image, ImageDraw, ImageFont

from segvit_jax import runtime
from segvit_jax.data import palettes, pipeline, registry
from segvit_jax.evaluation import pictures

GAP = 4  # white pixels between and around tiles
TITLE = 14  # pixels above each sample for its title
SWATCH = 12  # side of a legend entry's colour square
LEGEND_ROW = SWATCH + GAP


def define_flags() -> None:
  """The command line's flags (`runtime.run` defines them: importing this module defines none)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                  lock_config=True)
  flags.DEFINE_integer("num", 8, "Training samples to show.")
  flags.DEFINE_integer("cols", 2, "Samples (image + label pairs) per row.")
  flags.DEFINE_integer("min_side", 256, "Smallest shown side in pixels (nearest upscaling).")
  flags.DEFINE_string("output", "browse.png", "PNG file to write.")
  flags.mark_flag_as_required("config")


def denormalize(image: np.ndarray, mean, std) -> np.ndarray:
  """A normalised float (H, W, 3) image back to uint8: x * std + mean, rounded, clipped."""
  x = np.asarray(image, np.float32) * np.float32(std) + np.float32(mean)
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def class_map(batch: Mapping[str, Any], i: int) -> np.ndarray:
  """Sample i's (H, W) class ids: the label itself, or for a panoptic batch (segment-index
  maps) each segment's class from `segment_classes`; -1 where nothing is known."""
  label = np.asarray(batch["label"][i])
  if "segment_classes" not in batch:
    return label
  classes = np.asarray(batch["segment_classes"][i])
  valid = (label >= 0) & (label < len(classes))
  return np.where(valid, classes[np.clip(label, 0, len(classes) - 1)], -1)


def take_samples(config, num: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """The first `num` (uint8 image, class map) pairs of the training iterator."""
  if num < 1:
    raise app.UsageError(f"--num={num}: expected at least 1 sample")
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  out = []
  while len(out) < num:
    batch = next(it)
    for i in range(len(batch["image"])):
      if len(out) < num:
        out.append((denormalize(batch["image"][i], config.mean, config.std),
                    class_map(batch, i)))
  return out


def grid(samples, colours: np.ndarray, cols: int = 2, min_side: int = 256) -> np.ndarray:
  """(H, W, 3) uint8 grid: per sample "i" a title line over [image | label map], `cols`
  samples per row, GAP white pixels apart and around."""
  factor = pictures.upscale_factor(*samples[0][0].shape[:2], min_side)
  h, w = (s * factor for s in samples[0][0].shape[:2])
  cols = max(1, min(cols, len(samples)))
  rows = math.ceil(len(samples) / cols)
  cell_w, cell_h = 2 * w + GAP, h + TITLE
  canvas = np.full((GAP + rows * (cell_h + GAP), GAP + cols * (cell_w + GAP), 3), 255, np.uint8)
  for n, (image, label) in enumerate(samples):
    y = GAP + (n // cols) * (cell_h + GAP) + TITLE
    x = GAP + (n % cols) * (cell_w + GAP)
    canvas[y:y + h, x:x + w] = pictures.enlarge(image, factor)
    canvas[y:y + h, x + w + GAP:x + 2 * w + GAP] = pictures.enlarge(
        pictures.colorize(label, colours), factor)
  picture = Image.fromarray(canvas)
  draw = ImageDraw.Draw(picture)
  for n in range(len(samples)):
    y = GAP + (n // cols) * (cell_h + GAP)
    x = GAP + (n % cols) * (cell_w + GAP)
    draw.text((x, y), f"sample {n}: image", fill=(0, 0, 0))
    draw.text((x + w + GAP, y), "label", fill=(0, 0, 0))
  return np.asarray(picture)


def present_classes(samples, num_classes: int) -> list[int]:
  """The class ids in [0, num_classes) shown in the samples' label maps, ascending (ignore
  pixels, e.g. 255, and unknown -1 left out)."""
  return sorted({int(c) for _, label in samples for c in np.unique(label)
                 if 0 <= c < num_classes})


def legend(ids, names, colours: np.ndarray, width: int) -> np.ndarray:
  """(h, width, 3) uint8 strip: per class id a SWATCH-pixel square in its colour and its
  name, left to right, wrapped to `width`; ids without a name or colour are left out."""
  font = ImageFont.load_default()
  entries = [(i, names[i]) for i in ids if i < min(len(names), len(colours))]
  places, x, y = [], GAP, GAP
  for i, name in entries:
    w = SWATCH + GAP + int(np.ceil(font.getlength(name))) + 3 * GAP
    if x > GAP and x + w > width:
      x, y = GAP, y + LEGEND_ROW
    places.append((i, name, x, y))
    x += w
  strip = Image.new("RGB", (width, y + LEGEND_ROW + GAP if entries else 0), (255, 255, 255))
  draw = ImageDraw.Draw(strip)
  for i, name, x, y in places:
    draw.rectangle((x, y, x + SWATCH - 1, y + SWATCH - 1), fill=tuple(int(v) for v in colours[i]))
    draw.text((x + SWATCH + GAP, y), name, fill=(0, 0, 0), font=font)
  return np.asarray(strip).reshape(-1, width, 3)


def browse(config, num: int, output: str, cols: int = 2, min_side: int = 256) -> np.ndarray:
  """Writes the grid of `num` training samples of `config` to `output`, over a legend of the
  classes shown (names and colours); returns the picture."""
  samples = take_samples(config, num)
  colours = palettes.palette_for(config.dataset.name, int(config.dataset.num_classes))
  picture = grid(samples, colours, cols, min_side)
  names = registry.class_names(config.dataset)
  strip = legend(present_classes(samples, len(colours)), names, colours, picture.shape[1])
  picture = np.concatenate([picture, strip])
  Image.fromarray(picture).save(output)
  return picture


def main(argv: list[str]) -> None:
  runtime.no_arguments(argv)
  f = flags.FLAGS
  picture = browse(f.config, f.num, f.output, f.cols, f.min_side)
  print(f"wrote {f.output} ({f.num} training samples, {picture.shape[1]}x{picture.shape[0]})")


if __name__ == "__main__":
  sys.exit(runtime.run(main, define_flags=define_flags))
