"""Pictures of predictions: a fixed colour palette, colour overlays and side-by-side panels."""

from __future__ import annotations

import numpy as np
from PIL import Image


def palette(num_classes: int, seed: int = 3) -> np.ndarray:
  """(num_classes + 1, 3) uint8 colours; the last row (for ignore pixels) is black."""
  rng = np.random.default_rng(seed)
  colours = rng.integers(40, 256, size=(num_classes, 3), dtype=np.uint8)
  return np.concatenate([colours, np.zeros((1, 3), np.uint8)])


def colorize(label: np.ndarray, num_classes: int, colours: np.ndarray | None = None
             ) -> np.ndarray:
  """(H, W) class ids -> (H, W, 3) uint8 colours (`colours` (K, 3), e.g. a dataset's
  `datasets.palette_for`, default `palette`); ignore / out-of-range pixels black."""
  table = palette(num_classes) if colours is None else np.concatenate(
      [np.asarray(colours, np.uint8)[:num_classes], np.zeros((1, 3), np.uint8)])
  idx = np.where((label >= 0) & (label < num_classes), label, num_classes)
  return table[idx]


def overlay(image: np.ndarray, label: np.ndarray, num_classes: int, alpha: float = 0.5,
            colours: np.ndarray | None = None) -> np.ndarray:
  """Blends the colourised label map over a uint8 image of the same size."""
  colours = colorize(label, num_classes, colours).astype(np.float32)
  out = (1 - alpha) * image.astype(np.float32) + alpha * colours
  return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def panel(image: np.ndarray, label: np.ndarray | None, pred: np.ndarray,
          num_classes: int, colours: np.ndarray | None = None) -> np.ndarray:
  """[image | ground-truth overlay | prediction overlay] side by side."""
  parts = [image]
  if label is not None:
    parts.append(overlay(image, label, num_classes, colours=colours))
  parts.append(overlay(image, pred, num_classes, colours=colours))
  gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
  out = [parts[0]]
  for p in parts[1:]:
    out += [gap, p]
  return np.concatenate(out, axis=1)


def resize_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a uint8 (h, w, 3) image to (H, W) for display."""
  if image.shape[:2] == tuple(size):
    return image
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def save(path: str, array: np.ndarray, quality: int = 92) -> None:
  img = Image.fromarray(array)
  if path.lower().endswith((".jpg", ".jpeg")):
    img.save(path, quality=quality)
  else:
    img.save(path)
