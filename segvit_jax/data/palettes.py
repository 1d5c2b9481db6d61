"""Class colours: the one place that decides which colour a class gets in a picture.

  palette_for(dataset_name, num_classes)  by `config.dataset.name` (training, eval)
  palette_for_class_names(class_names)    by the class names alone (a bundle records its class
                                          names, not its dataset): the same colours

Cityscapes uses its official colours; every other dataset the `generated_palette` sequence
(mmseg's customary ADE20K / PASCAL-Context / COCO-Stuff palettes give some classes identical
colours, e.g. ADE20K road and skyscraper are both (140, 140, 140), so they are not used). Black
is never a class colour: it is left for ignore pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segvit_jax.data import ade20k, cityscapes, coco_stuff, pascal_context

# Official Cityscapes label colours (cityscapesScripts labels.py), in train-id order.
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
  """uint8 sRGB (..., 3) -> CIELAB (D65 white), float64."""
  c = rgb.astype(np.float64) / 255.0
  linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
  xyz = linear @ np.array([[0.4124, 0.3576, 0.1805],
                           [0.2126, 0.7152, 0.0722],
                           [0.0193, 0.1192, 0.9505]]).T
  t = xyz / np.array([0.95047, 1.0, 1.08883])
  delta = 6.0 / 29.0
  f = np.where(t > delta ** 3, np.cbrt(t), t / (3 * delta ** 2) + 4.0 / 29.0)
  return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]),
                   200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def generated_palette(num_colours: int) -> np.ndarray:
  """(num_colours, 3) uint8 colours, each as far as possible (CIELAB distance) from the ones
  before it and from black.

  Greedy farthest-point selection over the 16^3 RGB grid with steps of 17, starting from black
  (kept for ignore pixels, never returned). Deterministic, and palette n is the first n rows of
  palette n + 1, so a class keeps its colour whatever the class count.
  """
  levels = np.arange(0, 256, 17)
  grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
  if not 0 <= num_colours < len(grid):
    raise ValueError(f"can generate 0..{len(grid) - 1} colours, not {num_colours}")
  lab = srgb_to_lab(grid)
  nearest = np.linalg.norm(lab - lab[0], axis=-1)  # grid[0] is black
  chosen = []
  for _ in range(num_colours):
    i = int(np.argmax(nearest))
    chosen.append(i)
    nearest = np.minimum(nearest, np.linalg.norm(lab - lab[i], axis=-1))
  return grid[chosen].astype(np.uint8).reshape(num_colours, 3)


def _frozen(a: np.ndarray) -> np.ndarray:
  a.setflags(write=False)
  return a


_GENERATED = generated_palette(len(coco_stuff.COCO_STUFF_CLASSES))

# Dataset name -> (K, 3) uint8 class colours, all distinct and none black. pascal_context59 is
# pascal_context without background, so a class has the same colour in both variants.
PALETTES: dict[str, np.ndarray] = {
    "ade20k": _frozen(_GENERATED[:len(ade20k.ADE20K_CLASSES)].copy()),
    "coco_stuff10k": _frozen(_GENERATED.copy()),
    "pascal_context": _frozen(_GENERATED[:len(pascal_context.PASCAL_CONTEXT_CLASSES)].copy()),
    "pascal_context59": _frozen(_GENERATED[1:len(pascal_context.PASCAL_CONTEXT_CLASSES)].copy()),
    "cityscapes": _frozen(CITYSCAPES_PALETTE),
}

# The class names of each dataset in PALETTES, by which `palette_for_class_names` knows it.
DATASET_CLASSES: dict[str, tuple[str, ...]] = {
    "ade20k": ade20k.ADE20K_CLASSES,
    "coco_stuff10k": coco_stuff.COCO_STUFF_CLASSES,
    "pascal_context": pascal_context.PASCAL_CONTEXT_CLASSES,
    "pascal_context59": pascal_context.PASCAL_CONTEXT59_CLASSES,
    "cityscapes": cityscapes.CITYSCAPES_CLASSES,
}


def palette_for(dataset_name: str, num_classes: int) -> np.ndarray:
  """(num_classes, 3) uint8 class colours: `PALETTES[dataset_name]` when it has num_classes
  rows, else (other datasets, or e.g. ade20k without reduce_zero_label: 151 classes) the first
  num_classes colours of `generated_palette`. Black is never used (left for ignore pixels)."""
  palette = PALETTES.get(dataset_name)
  if palette is not None and len(palette) == num_classes:
    return palette.copy()
  return generated_palette(num_classes)


def palette_for_class_names(class_names: Sequence[str]) -> np.ndarray:
  """(K, 3) uint8 colours for K class names: the palette of the dataset with exactly these
  class names (in this order), as `palette_for` gives it, else `generated_palette(K)`."""
  names = tuple(class_names)
  dataset = next((d for d, known in DATASET_CLASSES.items() if known == names), "")
  return palette_for(dataset, len(names))
