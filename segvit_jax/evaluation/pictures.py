"""Pictures of predictions: colour overlays and side-by-side panels in the classes' palette
(`segvit_jax.data.palettes`, the same in training, evaluation and prediction), and a
confusion-matrix heat map (`confusion_picture`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def colorize(label: np.ndarray, colours: np.ndarray) -> np.ndarray:
  """(H, W) class ids -> (H, W, 3) uint8 colours from `colours` (K, 3), the classes' palette
  (`segvit_jax.data.palettes`); ignore / out-of-range pixels black."""
  k = len(colours)
  table = np.concatenate([np.asarray(colours, np.uint8), np.zeros((1, 3), np.uint8)])
  idx = np.where((label >= 0) & (label < k), label, k)
  return table[idx]


def overlay(image: np.ndarray, label: np.ndarray, colours: np.ndarray,
            alpha: float = 0.5) -> np.ndarray:
  """Blends the colourised label map over a uint8 image of the same size."""
  painted = colorize(label, colours).astype(np.float32)
  out = (1 - alpha) * image.astype(np.float32) + alpha * painted
  return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def panel(image: np.ndarray, label: np.ndarray | None, pred: np.ndarray,
          colours: np.ndarray) -> np.ndarray:
  """[image | ground-truth overlay | prediction overlay] side by side."""
  parts = [image]
  if label is not None:
    parts.append(overlay(image, label, colours))
  parts.append(overlay(image, pred, colours))
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


# Confusion-matrix picture. One cell holds one line of PIL's default font; names are cut to
# these many characters (rows on the left, rotated columns on top).
_CELL = 14
_PAD = 4
_ROW_CHARS = 24
_COL_CHARS = 12
_DARK = np.array([8, 48, 107], np.float64)  # colour of a row share of 1.0 (white at 0.0)
_NO_PIXELS = (200, 200, 200)  # rows whose class has no ground-truth pixels
_GRID_LINE = (230, 230, 230)


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
  return ImageFont.load_default()


def _text_width(text: str) -> int:
  return int(np.ceil(_font().getlength(text)))


def _line_height() -> int:
  return _font().getbbox("Ag")[3] + 1


def _abbrev(name: str, max_chars: int) -> str:
  return name if len(name) <= max_chars else name[:max_chars - 1] + "."


class _Layout(NamedTuple):
  """Where the matrix lies in the picture: cell (i, j) has its top-left corner at
  (top + i * cell, left + j * cell) in (y, x)."""
  left: int
  top: int
  cell: int

  def centre(self, i: int, j: int) -> tuple[int, int]:
    return self.top + i * self.cell + self.cell // 2, self.left + j * self.cell + self.cell // 2


def _layout(names: Sequence[str]) -> _Layout:
  """Grid origin after the title line, the row names (left) and rotated column names (top)."""
  left = 2 * _PAD + max(_text_width(_abbrev(n, _ROW_CHARS)) for n in names)
  top = _PAD + _line_height() + _PAD + max(_text_width(_abbrev(n, _COL_CHARS)) for n in names)
  return _Layout(left, top + _PAD, _CELL)


def _shown_classes(gt_pixels: np.ndarray, max_classes: int) -> np.ndarray:
  """Ids of the `max_classes` classes with the most ground-truth pixels, in id order (ties go
  to the lower id); all classes if there are no more than `max_classes`."""
  if len(gt_pixels) <= max_classes:
    return np.arange(len(gt_pixels))
  return np.sort(np.argsort(-gt_pixels, kind="stable")[:max_classes])


def _ramp(share: np.ndarray) -> np.ndarray:
  """Row shares in [0, 1] (...,) -> (..., 3) uint8 from white to `_DARK`; NaN -> `_NO_PIXELS`."""
  rgb = np.rint(255.0 + np.nan_to_num(share)[..., None] * (_DARK - 255.0)).astype(np.uint8)
  return np.where(np.isnan(share)[..., None], np.array(_NO_PIXELS, np.uint8), rgb)


def _title(num_classes: int, num_shown: int, total_pixels: int) -> str:
  shown = (f"{num_shown} classes" if num_shown == num_classes else
           f"{num_shown} of {num_classes} classes with the most pixels")
  return (f"Confusion matrix {num_classes}x{num_classes}, {total_pixels:,} px: {shown}; "
          "rows = ground truth (each row / its pixels), columns = prediction")


def confusion_picture(conf: np.ndarray, class_names: Sequence[str], max_classes: int = 40
                      ) -> np.ndarray:
  """(H, W, 3) uint8 heat map of a (K, K) confusion matrix (rows = ground truth, columns =
  prediction, as `metrics.confusion_matrix`), each row divided by its ground-truth pixel count
  (so a row sums to 1 over all K columns; a class without pixels is a grey row). With more than
  `max_classes` classes only those with the most ground-truth pixels are drawn."""
  conf = np.asarray(conf, np.int64)
  k = conf.shape[0]
  if conf.shape != (k, k) or len(class_names) != k:
    raise ValueError(f"{len(class_names)} class names for a confusion matrix of shape {conf.shape}")
  gt_pixels = conf.sum(axis=1)
  shown = _shown_classes(gt_pixels, max_classes)
  with np.errstate(divide="ignore", invalid="ignore"):
    share = conf[np.ix_(shown, shown)] / gt_pixels[shown, None]
  names = [str(class_names[i]) for i in shown]
  layout, n, c, line = _layout(names), len(shown), _CELL, _line_height()
  grid = np.repeat(np.repeat(_ramp(share), c, axis=0), c, axis=1)
  grid[c - 1::c], grid[:, c - 1::c] = _GRID_LINE, _GRID_LINE
  title = _title(k, n, int(gt_pixels.sum()))
  width = max(layout.left + n * c, _PAD + _text_width(title)) + _PAD
  img = Image.new("RGB", (width, layout.top + n * c + _PAD), "white")
  img.paste(Image.fromarray(grid), (layout.left, layout.top))
  draw = ImageDraw.Draw(img)
  draw.text((_PAD, _PAD), title, fill="black", font=_font())
  for i, name in enumerate(names):
    row_name, col_name = _abbrev(name, _ROW_CHARS), _abbrev(name, _COL_CHARS)
    y = layout.top + i * c + (c - line) // 2
    draw.text((layout.left - _PAD - _text_width(row_name), y), row_name, fill="black",
              font=_font())
    label = Image.new("RGB", (_text_width(col_name), line), "white")
    ImageDraw.Draw(label).text((0, 0), col_name, fill="black", font=_font())
    label = label.rotate(90, expand=True)  # reads bottom to top, ending above its column
    img.paste(label, (layout.left + i * c + (c - line) // 2, layout.top - _PAD - label.height))
  return np.array(img)
