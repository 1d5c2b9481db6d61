"""Pictures of predictions in the classes' palette (`segvit_jax.data.palettes`, the one palette
per dataset used by training, evaluation, prediction and the tools), drawn with PIL only (no
matplotlib: eval.py and predict.py run without it).

  panel(image, label, pred, colours, class_names)   eval's [image | ground truth | prediction |
                                                    overlay] picture, titled, with a legend
  overlay_picture(image, pred, colours, class_names) predict.py's overlay with the same legend
  titled_panels / with_legend                       the same for any parts (panoptic pictures)
  confusion_picture(conf, class_names)              the most confused classes' row-normalised
                                                    confusion matrix, values in the cells, a
                                                    colour bar

Where things lie is computed by pure functions (`panel_layout`, `legend_layout`,
`confusion_layout`) that the drawing follows, so tests read the layout as data.
"""

from __future__ import annotations

import functools
import math
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


# Text: PIL's default font (one line of it is `_line_height()` px high).
_PAD = 4
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
  return ImageFont.load_default()


def _text_width(text: str) -> int:
  return int(np.ceil(_font().getlength(text)))


def _line_height() -> int:
  return _font().getbbox("Ag")[3] + 1


# Panels (eval pictures) and legends (eval pictures and predict.py overlays).
MIN_SIDE = 256  # a panel's short side is at least this many pixels (nearest upscaling)
_GAP = 4  # white pixels between panels
_SWATCH = 12  # legend colour squares, px
_ENTRY_GAP = 12  # px between legend entries on a line


def upscale_factor(h: int, w: int, min_side: int = MIN_SIDE) -> int:
  """The whole factor that brings the short side of an (h, w) picture to >= `min_side`
  (1 for pictures already that large)."""
  return max(1, math.ceil(min_side / max(1, min(h, w))))


def enlarge(array: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour upscaling by a whole factor (label maps stay exact)."""
  return array.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else array


def present_classes(*labels: np.ndarray | None, num_classes: int) -> list[int]:
  """Sorted ids in [0, num_classes) found in any of the label maps (None skipped); ignore and
  out-of-range values are no class."""
  found = set()
  for label in labels:
    if label is not None:
      found.update(int(c) for c in np.unique(label) if 0 <= c < num_classes)
  return sorted(found)


class LegendEntry(NamedTuple):
  class_id: int
  name: str
  swatch: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1 / y1 exclusive
  text_xy: tuple[int, int]


def legend_layout(classes: Sequence[int], class_names: Sequence[str], width: int, top: int
                  ) -> tuple[list[LegendEntry], int]:
  """Legend entries (a colour square, then the full class name) for `classes`, laid out in
  lines that fit `width` px from y = `top`; returns the entries and the y below the legend."""
  line = max(_SWATCH, _line_height()) + _PAD
  entries, x, y = [], _PAD, top + _PAD
  for c in classes:
    name = str(class_names[c]) if c < len(class_names) else str(c)
    need = _SWATCH + _PAD + _text_width(name)
    if x > _PAD and x + need > width - _PAD:
      x, y = _PAD, y + line
    sy = y + (line - _PAD - _SWATCH) // 2
    entries.append(LegendEntry(int(c), name, (x, sy, x + _SWATCH, sy + _SWATCH),
                               (x + _SWATCH + _PAD, y)))
    x += need + _ENTRY_GAP
  return entries, (y + line if entries else top)


class PanelLayout(NamedTuple):
  """Where a titled row of panels and its legend lie: panel i's top-left corner at
  (panels_top, panel_x[i]) in (y, x), each (panel_h, panel_w) px, its title above it."""
  factor: int
  panel_h: int
  panel_w: int
  titles: tuple[str, ...]
  panel_x: tuple[int, ...]
  panels_top: int
  legend: tuple[LegendEntry, ...]
  height: int
  width: int

  @property
  def legend_classes(self) -> list[int]:
    return [e.class_id for e in self.legend]

  @property
  def legend_names(self) -> list[str]:
    return [e.name for e in self.legend]


def panel_layout(h: int, w: int, titles: Sequence[str], classes: Sequence[int],
                 class_names: Sequence[str], min_side: int = MIN_SIDE) -> PanelLayout:
  """The layout of `len(titles)` (h, w) panels, upscaled by a whole factor to a short side
  >= `min_side`, side by side under a title strip, with a legend of `classes` below."""
  factor = upscale_factor(h, w, min_side)
  ph, pw = h * factor, w * factor
  xs = tuple(i * (pw + _GAP) for i in range(len(titles)))
  width = max(xs[-1] + pw, _PAD + max(_text_width(t) for t in titles))
  top = _PAD + _line_height() + _PAD
  legend, height = legend_layout(classes, class_names, width, top + ph)
  return PanelLayout(factor, ph, pw, tuple(titles), xs, top, tuple(legend), height, width)


def _draw_legend(draw: ImageDraw.ImageDraw, legend: Sequence[LegendEntry],
                 colours: np.ndarray) -> None:
  for e in legend:
    draw.rectangle((e.swatch[0], e.swatch[1], e.swatch[2] - 1, e.swatch[3] - 1),
                   fill=tuple(int(v) for v in colours[e.class_id]))
    draw.text(e.text_xy, e.name, fill=_BLACK, font=_font())


def titled_panels(parts: Sequence[np.ndarray], titles: Sequence[str], classes: Sequence[int],
                  class_names: Sequence[str], colours: np.ndarray) -> np.ndarray:
  """(H, W, 3) uint8: the same-sized uint8 (h, w, 3) `parts` side by side, enlarged (nearest)
  as `panel_layout` says, each under its title, the legend of `classes` below."""
  h, w = parts[0].shape[:2]
  lay = panel_layout(h, w, titles, classes, class_names)
  canvas = np.full((lay.height, lay.width, 3), 255, np.uint8)
  for part, x in zip(parts, lay.panel_x):
    canvas[lay.panels_top:lay.panels_top + lay.panel_h, x:x + lay.panel_w] = enlarge(
        part, lay.factor)
  img = Image.fromarray(canvas)
  draw = ImageDraw.Draw(img)
  for title, x in zip(titles, lay.panel_x):
    draw.text((x + _PAD, _PAD), title, fill=_BLACK, font=_font())
  _draw_legend(draw, lay.legend, colours)
  return np.array(img)


PANEL_TITLES = ("image", "ground truth", "prediction", "prediction overlay")


def panel_titles(with_label: bool) -> tuple[str, ...]:
  """Titles of `panel`'s panels (no ground-truth panel without a label)."""
  return PANEL_TITLES if with_label else tuple(t for t in PANEL_TITLES if t != "ground truth")


def panel(image: np.ndarray, label: np.ndarray | None, pred: np.ndarray, colours: np.ndarray,
          class_names: Sequence[str]) -> np.ndarray:
  """[image | ground truth | prediction | prediction overlay] (`panel_titles`): the label maps
  solid in the palette, the prediction also blended over the image; legend of the classes in
  the ground truth or prediction. Small images are enlarged (nearest) to `MIN_SIDE`."""
  parts = [image] + ([colorize(label, colours)] if label is not None else [])
  parts += [colorize(pred, colours), overlay(image, pred, colours)]
  classes = present_classes(label, pred, num_classes=len(colours))
  return titled_panels(parts, panel_titles(label is not None), classes, class_names, colours)


def legend_width(classes: Sequence[int], class_names: Sequence[str]) -> int:
  """The narrowest width that holds the widest legend entry of `classes` (0 for none)."""
  return max((3 * _PAD + _SWATCH + _text_width(str(class_names[c])) for c in classes),
             default=0)


def with_legend(picture: np.ndarray, classes: Sequence[int], class_names: Sequence[str],
                colours: np.ndarray) -> tuple[np.ndarray, list[LegendEntry]]:
  """`picture` (h, w, 3) uint8 at the top left (a small one enlarged, nearest, by the whole
  factor that brings its short side to `MIN_SIDE`, as the panels are), the legend of `classes`
  (names and palette colours, laid out by `legend_layout`) below it, widened with white to the
  right where a name is wider than the picture; returns the picture and the legend's entries."""
  picture = enlarge(picture, upscale_factor(*picture.shape[:2]))
  h, w = picture.shape[:2]
  width = max(w, legend_width(classes, class_names))
  legend, height = legend_layout(classes, class_names, width, h)
  canvas = np.full((height, width, 3), 255, np.uint8)
  canvas[:h, :w] = picture
  img = Image.fromarray(canvas)
  _draw_legend(ImageDraw.Draw(img), legend, colours)
  return np.array(img), legend


def overlay_picture(image: np.ndarray, pred: np.ndarray, colours: np.ndarray,
                    class_names: Sequence[str]) -> np.ndarray:
  """predict.py's overlay: the prediction blended over the image at its own size (a small
  image enlarged to `MIN_SIDE`, as eval's panels), a legend of the predicted classes (names and
  palette colours, as eval's panels) below."""
  return with_legend(overlay(image, pred, colours),
                     present_classes(pred, num_classes=len(colours)), class_names, colours)[0]


# Confusion-matrix picture: rows = ground truth, columns = prediction, each row divided by its
# ground-truth pixels; the cells wide enough for "100" in the default font.
_CELL = 26
_TOP_K = 20
_BAR_W = 16
_DARK = np.array([8, 48, 107], np.float64)  # colour of a row share of 1.0 (white at 0.0)
_NO_PIXELS = (200, 200, 200)  # rows whose class has no ground-truth pixels
_GRID_LINE = (230, 230, 230)
BAR_TICKS = (1.0, 0.5, 0.0)  # colour-bar labels, top to bottom


def most_confused(conf: np.ndarray, top_k: int = _TOP_K) -> np.ndarray:
  """Ids of the `top_k` classes with the most off-diagonal pixels (missed as ground truth plus
  wrongly predicted), in id order (ties go to the lower id); all classes if there are no more
  than `top_k`."""
  conf = np.asarray(conf, np.int64)
  if len(conf) <= top_k:
    return np.arange(len(conf))
  off = conf.sum(axis=0) + conf.sum(axis=1) - 2 * np.diagonal(conf)
  return np.sort(np.argsort(-off, kind="stable")[:top_k])


def confusion_title(num_classes: int, num_shown: int, total_pixels: int) -> tuple[str, str]:
  """The picture's two title lines: which classes are shown, and how to read it."""
  shown = (f"Confusion matrix, {num_classes} classes" if num_shown == num_classes else
           f"Confusion matrix, {num_shown} most confused of {num_classes} classes")
  return (f"{shown} ({total_pixels:,} px)",
          "rows = ground truth, columns = prediction; cells: % of the row's pixels")


class ConfusionLayout(NamedTuple):
  """Where the parts of `confusion_picture` lie: cell (i, j) has its top-left corner at
  (top + i * cell, left + j * cell) in (y, x); the colour bar fills `bar` (x0, y0, x1, y1),
  1.0 at the top, 0.0 at the bottom."""
  shown: tuple[int, ...]
  names: tuple[str, ...]
  title: tuple[str, str]
  left: int
  top: int
  cell: int
  bar: tuple[int, int, int, int]
  height: int
  width: int

  def corner(self, i: int, j: int) -> tuple[int, int]:
    """A pixel of cell (i, j) that no number is written on (y, x)."""
    return self.top + i * self.cell + 2, self.left + j * self.cell + 2


def confusion_layout(conf: np.ndarray, class_names: Sequence[str], top_k: int = _TOP_K
                     ) -> ConfusionLayout:
  """The classes shown (`most_confused`) with their full names, the title, the grid after the
  row names (left) and the rotated column names (top), the colour bar to its right."""
  conf = np.asarray(conf, np.int64)
  k = conf.shape[0]
  if conf.shape != (k, k) or len(class_names) != k:
    raise ValueError(f"{len(class_names)} class names for a confusion matrix of shape {conf.shape}")
  if not 1 <= top_k <= _TOP_K:
    raise ValueError(f"top_k={top_k}: expected 1..{_TOP_K} (more is not legible)")
  shown = most_confused(conf, top_k)
  names = tuple(str(class_names[i]) for i in shown)
  title = confusion_title(k, len(shown), int(conf.sum()))
  line, n = _line_height(), len(shown)
  left = 2 * _PAD + max(_text_width(s) for s in names)
  top = _PAD + 2 * line + 2 * _PAD + max(_text_width(s) for s in names) + _PAD
  bar_h = max(n * _CELL, 5 * line)
  bar_x = left + n * _CELL + 3 * _PAD
  bar = (bar_x, top, bar_x + _BAR_W, top + bar_h)
  width = max(bar[2] + _PAD + _text_width("100%"), _PAD + max(map(_text_width, title))) + _PAD
  return ConfusionLayout(tuple(int(i) for i in shown), names, title, left, top, _CELL, bar,
                         top + bar_h + _PAD, width)


def _ramp(share: np.ndarray) -> np.ndarray:
  """Row shares in [0, 1] (...,) -> (..., 3) uint8 from white to `_DARK`; NaN -> `_NO_PIXELS`."""
  rgb = np.rint(255.0 + np.nan_to_num(share)[..., None] * (_DARK - 255.0)).astype(np.uint8)
  return np.where(np.isnan(share)[..., None], np.array(_NO_PIXELS, np.uint8), rgb)


def bar_values(height: int) -> np.ndarray:
  """(height,) the share each row of the colour bar shows, 1.0 at the top to 0.0 at the bottom."""
  return np.linspace(1.0, 0.0, height)


def row_shares(conf: np.ndarray, shown: Sequence[int]) -> np.ndarray:
  """(n, n) shares of the shown classes' cells, each divided by all of its row's ground-truth
  pixels (over all K columns); NaN for a class without pixels."""
  conf = np.asarray(conf, np.int64)
  gt = conf.sum(axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    return conf[np.ix_(shown, shown)] / gt[np.asarray(shown), None]


def confusion_picture(conf: np.ndarray, class_names: Sequence[str], top_k: int = _TOP_K
                      ) -> np.ndarray:
  """(H, W, 3) uint8 heat map of a (K, K) confusion matrix (rows = ground truth, columns =
  prediction, as `metrics.confusion_matrix`) over the `top_k` most confused classes, each row
  divided by its ground-truth pixel count (a class without pixels is a grey row), the share in
  % written in every cell where it rounds to at least 1, full class names, a colour bar."""
  lay = confusion_layout(conf, class_names, top_k)
  share = row_shares(conf, lay.shown)
  n, c, line = len(lay.shown), lay.cell, _line_height()
  grid = np.repeat(np.repeat(_ramp(share), c, axis=0), c, axis=1)
  grid[c - 1::c], grid[:, c - 1::c] = _GRID_LINE, _GRID_LINE
  img = Image.new("RGB", (lay.width, lay.height), "white")
  img.paste(Image.fromarray(grid), (lay.left, lay.top))
  x0, y0, x1, y1 = lay.bar
  bar = np.repeat(_ramp(bar_values(y1 - y0))[:, None], x1 - x0, axis=1)
  img.paste(Image.fromarray(bar), (x0, y0))
  draw = ImageDraw.Draw(img)
  for t, text in enumerate(lay.title):
    draw.text((_PAD, _PAD + t * (line + _PAD)), text, fill=_BLACK, font=_font())
  for value in BAR_TICKS:
    y = y0 + round((1.0 - value) * (y1 - y0 - 1))
    draw.line((x1, y, x1 + 2, y), fill=_BLACK)
    draw.text((x1 + _PAD, min(max(y - line // 2, y0), y1 - line)), f"{value:.0%}",
              fill=_BLACK, font=_font())
  for i, name in enumerate(lay.names):
    y = lay.top + i * c + (c - line) // 2
    draw.text((lay.left - _PAD - _text_width(name), y), name, fill=_BLACK, font=_font())
    label = Image.new("RGB", (_text_width(name), line), "white")
    ImageDraw.Draw(label).text((0, 0), name, fill=_BLACK, font=_font())
    label = label.rotate(90, expand=True)  # reads bottom to top, ending above its column
    img.paste(label, (lay.left + i * c + (c - line) // 2, lay.top - _PAD - label.height))
    for j in range(n):
      if np.isnan(share[i, j]) or round(100 * share[i, j]) < 1:
        continue
      text = f"{round(100 * share[i, j])}"
      fill = _WHITE if share[i, j] > 0.5 else _BLACK
      draw.text((lay.left + j * c + (c - 1 - _text_width(text)) // 2,
                 lay.top + i * c + (c - 1 - line) // 2), text, fill=fill, font=_font())
  return np.array(img)
