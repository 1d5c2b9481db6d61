"""Pictures read back from the files they are written to: eval's titled panels (short side >=
256 px for a 32-px input, the title strip, the legend's classes and swatch colours = the
palette), predict.py's overlay with the same legend, and the confusion picture at 150 classes
(exactly the 20 most confused classes' full names, the row shares in the cells, the colour bar)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segvit_jax.data import ade20k, palettes
from segvit_jax.evaluation import pictures

NAMES = ade20k.ADE20K_CLASSES
COLOURS = palettes.palette_for("ade20k", len(NAMES))


def _read(path) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def _swatch_colours(picture: np.ndarray, legend) -> np.ndarray:
  """(n, 3) the colour at the centre of each legend swatch."""
  return np.array([picture[(e.swatch[1] + e.swatch[3]) // 2, (e.swatch[0] + e.swatch[2]) // 2]
                   for e in legend])


def _has_text(region: np.ndarray) -> bool:
  """Dark pixels (text) on a white background."""
  return bool((region.astype(int).sum(-1) < 300).any())


@pytest.fixture(scope="module")
def sample():
  """A 32 x 40 image, a ground truth of classes {0, 3, 12, 255 (ignore)} and a prediction of
  {0, 3, 20}: the legend must list 0, 3, 12, 20."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (32, 40, 3), np.uint8)
  label = np.zeros((32, 40), np.int32)
  label[:, 10:20], label[:, 20:30], label[:4] = 3, 12, 255
  pred = label.copy()
  pred[:4], pred[:, 20:30] = 0, 20
  return image, label, pred


def test_panel_written_and_read_back(sample, tmp_path):
  image, label, pred = sample
  lay = pictures.panel_layout(32, 40, pictures.panel_titles(True), [0, 3, 12, 20], NAMES)
  assert lay.titles == ("image", "ground truth", "prediction", "prediction overlay")
  assert lay.factor == 8 and (lay.panel_h, lay.panel_w) == (256, 320)  # short side 32 -> 256
  assert lay.legend_classes == [0, 3, 12, 20]
  assert lay.legend_names == ["wall", "floor", "person", "car"]
  picture = pictures.panel(image, label, pred, COLOURS, NAMES)
  assert picture.shape == (lay.height, lay.width, 3)
  pictures.save(str(tmp_path / "p.png"), picture)
  pictures.save(str(tmp_path / "p.jpg"), picture)
  png, jpg = _read(tmp_path / "p.png"), _read(tmp_path / "p.jpg")
  assert png.shape == jpg.shape == (lay.height, lay.width, 3)
  assert min(png.shape[:2]) >= 256 and lay.height > lay.panels_top + 256  # legend below
  # The panels, exactly (PNG): the image and both label maps solid, enlarged with nearest.
  top, h, w = lay.panels_top, lay.panel_h, lay.panel_w
  want = [image, pictures.colorize(label, COLOURS), pictures.colorize(pred, COLOURS),
          pictures.overlay(image, pred, COLOURS)]
  for x, part in zip(lay.panel_x, want):
    np.testing.assert_array_equal(png[top:top + h, x:x + w], pictures.enlarge(part, 8))
  # A title over every panel, in the strip above it.
  for x in lay.panel_x:
    assert _has_text(png[:top, x:x + w])
  # Legend swatches in the palette's colours: exact in the PNG, max abs difference <= 16 in
  # the JPEG (12-px squares on white, quality 92).
  np.testing.assert_array_equal(_swatch_colours(png, lay.legend), COLOURS[[0, 3, 12, 20]])
  jpeg_error = np.abs(_swatch_colours(jpg, lay.legend).astype(int) - COLOURS[[0, 3, 12, 20]])
  assert jpeg_error.max() <= 16, jpeg_error.max()  # measured: 9
  for e in lay.legend:  # each name written right of its swatch
    x, y = e.text_xy
    assert _has_text(png[y:y + 12, x:x + 20])


def test_panel_without_label_and_large_image(sample):
  image, _, pred = sample
  picture = pictures.panel(image, None, pred, COLOURS, NAMES)
  lay = pictures.panel_layout(32, 40, pictures.panel_titles(False), [0, 3, 20], NAMES)
  assert lay.titles == ("image", "prediction", "prediction overlay")
  assert picture.shape == (lay.height, lay.width, 3) and len(lay.panel_x) == 3
  big = pictures.panel_layout(300, 400, pictures.PANEL_TITLES, [1], NAMES)
  assert big.factor == 1 and (big.panel_h, big.panel_w) == (300, 400)
  assert pictures.upscale_factor(100, 255) == 3 and pictures.upscale_factor(256, 999) == 1


def test_legend_wraps_inside_the_width():
  legend, bottom = pictures.legend_layout(range(150), NAMES, 400, 0)
  assert [e.class_id for e in legend] == list(range(150))
  assert [e.name for e in legend] == list(NAMES)  # full names
  assert max(e.text_xy[0] + pictures._text_width(e.name) for e in legend) <= 400
  assert len({e.swatch[1] for e in legend}) > 10 and bottom > legend[-1].swatch[3]
  assert pictures.present_classes(np.array([[255, 2], [2, 7]]), None, np.array([0]),
                                  num_classes=5) == [0, 2]


def test_predict_overlay_carries_the_legend(sample, tmp_path):
  image, _, pred = sample
  picture = pictures.overlay_picture(image, pred, COLOURS, NAMES)
  _, legend = pictures.with_legend(image, [0, 3, 20], NAMES, COLOURS)
  assert [e.name for e in legend] == ["wall", "floor", "car"]
  pictures.save(str(tmp_path / "o.png"), picture)
  png = _read(tmp_path / "o.png")
  line = max(12, pictures._line_height()) + 4  # a legend line: swatch or text, a 4-px gap
  lines = len({e.swatch[1] for e in legend})
  # The 32 x 40 overlay enlarged 8x (nearest) to a 256-px short side, as eval's panels.
  assert png.shape == (256 + 4 + lines * line, 320, 3)  # 4-px margin, then the legend
  np.testing.assert_array_equal(png[:256, :320],
                                pictures.enlarge(pictures.overlay(image, pred, COLOURS), 8))
  # A name wider than the picture widens it with white to hold the full name.
  names = list(NAMES)
  names[3] = "a class name far wider than the enlarged picture " * 2
  widened, _ = pictures.with_legend(image, [3], names, COLOURS)
  assert widened.shape[1] == pictures.legend_width([3], names) > 320
  assert (widened[:256, 320:] == 255).all()
  np.testing.assert_array_equal(_swatch_colours(png, legend), COLOURS[[0, 3, 20]])
  wide = pictures.overlay_picture(np.zeros((300, 500, 3), np.uint8), np.full((300, 500), 7),
                                  COLOURS, NAMES)
  assert wide.shape == (300 + 4 + line, 500, 3)  # wide enough: one line, not widened


@pytest.fixture(scope="module")
def confusion_150():
  """150 ADE20K classes, every one with a diagonal; off-diagonal pixels only from class c in
  100..124 to class c + 25, 10 (c - 99) of them, so the 20 most confused are 115..124 and their
  partners 140..149 (a class's mass: its row's and its column's off-diagonal pixels). Row 115
  sends half of its pixels to class 140."""
  k = len(NAMES)
  conf = np.diag(np.full(k, 1000, np.int64))
  for c in range(100, 125):
    conf[c, c + 25] = 10 * (c - 99)
  conf[115, 115], conf[115, 140] = 500, 500
  return conf


def test_confusion_picture_at_150_classes(confusion_150, tmp_path):
  conf = confusion_150
  lay = pictures.confusion_layout(conf, NAMES)
  assert lay.shown == (*range(115, 125), *range(140, 150))
  assert lay.names == (*NAMES[115:125], *NAMES[140:150])  # full names, e.g. "crt screen"
  assert "20 most confused of 150 classes" in lay.title[0]
  picture = pictures.confusion_picture(conf, NAMES)
  pictures.save(str(tmp_path / "confusion.png"), picture)
  png = _read(tmp_path / "confusion.png")
  assert png.shape == (lay.height, lay.width, 3)
  # Room for every full name: row names right of x = 0, rotated column names below the title.
  longest = max(pictures._text_width(n) for n in lay.names)
  assert lay.left >= longest and lay.top >= 2 * pictures._line_height() + longest
  # Cells in the ramp of their row shares (each row over all 150 columns).
  share = pictures.row_shares(conf, lay.shown)
  assert share[0, 0] == share[0, 10] == 0.5
  cells = np.array([[png[lay.corner(i, j)] for j in range(20)] for i in range(20)])
  np.testing.assert_array_equal(cells, pictures._ramp(share))
  # Numbers: written in the cells with a share >= 1 % (the diagonal, row 115's "50"), only.
  c = lay.cell

  def cell(i, j):
    y, x = lay.top + i * c, lay.left + j * c
    return png[y + 3:y + c - 3, x + 3:x + c - 3].astype(int)

  assert np.ptp(cell(0, 10), axis=(0, 1)).max() > 100  # "50" on the mid-blue cell
  assert np.ptp(cell(3, 3), axis=(0, 1)).max() > 100  # "84" in white on dark blue
  assert np.ptp(cell(3, 7), axis=(0, 1)).max() == 0  # an empty cell stays plain
  # The colour bar: the ramp from 1.0 (top) to 0.0, its scale written to its right.
  x0, y0, x1, y1 = lay.bar
  np.testing.assert_array_equal(png[y0:y1, (x0 + x1) // 2],
                                pictures._ramp(pictures.bar_values(y1 - y0)))
  assert y1 - y0 == 20 * c
  for y in (y0, (y0 + y1) // 2, y1 - 12):
    assert _has_text(png[y:y + 12, x1 + 2:lay.width])


def test_confusion_picture_small_and_errors():
  conf = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
  lay = pictures.confusion_layout(conf, ["a", "b", "c"])
  assert lay.shown == (0, 1, 2) and lay.title[0].startswith("Confusion matrix, 3 classes")
  picture = pictures.confusion_picture(conf, ["a", "b", "c"])
  np.testing.assert_array_equal(picture[lay.corner(2, 0)], pictures._NO_PIXELS)  # no pixels
  np.testing.assert_array_equal(picture[lay.corner(0, 1)], pictures._ramp(np.array(0.25)))
  with pytest.raises(ValueError, match="top_k=21: expected 1..20"):
    pictures.confusion_layout(conf, ["a", "b", "c"], top_k=21)
  with pytest.raises(ValueError, match="2 class names for a confusion matrix of shape"):
    pictures.confusion_layout(conf, ["a", "b"])
