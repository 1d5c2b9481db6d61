"""Metrics on hand-computed cases and against a numpy confusion matrix."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from segvit_jax.evaluation import metrics, pictures

# 3 classes, rows = GT, cols = prediction:
#   [[3, 1, 0],
#    [1, 2, 1],
#    [0, 0, 2]]
# TP = (3, 2, 2), GT = (4, 4, 2), Pred = (4, 3, 3)
# IoU = 3/5, 2/5, 2/3 -> mIoU = (5/3)/3 = 5/9; Acc = 3/4, 2/4, 2/2 -> mAcc = 3/4; aAcc = 7/10.
HAND_LABEL = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
HAND_PRED = [0, 0, 0, 1, 0, 1, 1, 2, 2, 2]
HAND_CONF = np.array([[3, 1, 0], [1, 2, 1], [0, 0, 2]])


def test_confusion_matrix_hand_case_with_ignore():
  label = np.array(HAND_LABEL + [255, 255, 255])
  pred = np.array(HAND_PRED + [0, 1, 2])  # predictions under ignore pixels never count
  conf = metrics.confusion_matrix(pred.reshape(1, 13), label.reshape(1, 13), 3)
  assert conf.shape == (3, 3)
  assert np.issubdtype(conf.dtype, np.integer)
  np.testing.assert_array_equal(np.asarray(conf), HAND_CONF)


def test_metrics_hand_case_exact():
  r = metrics.segmentation_metrics(HAND_CONF, ["a", "b", "c"])
  assert abs(r["mIoU"] - 100 * 5 / 9) < 1e-9
  assert abs(r["mAcc"] - 75.0) < 1e-9
  assert abs(r["aAcc"] - 70.0) < 1e-9
  expected_iou = [60.0, 40.0, 200 / 3]
  expected_acc = [75.0, 50.0, 100.0]
  assert [c["name"] for c in r["per_class"]] == ["a", "b", "c"]
  for c, iou, acc in zip(r["per_class"], expected_iou, expected_acc):
    assert abs(c["IoU"] - iou) < 1e-9 and abs(c["Acc"] - acc) < 1e-9


def test_class_absent_and_never_predicted_is_nan_and_excluded():
  conf = np.zeros((4, 4), np.int64)
  conf[:3, :3] = HAND_CONF
  r = metrics.segmentation_metrics(conf)
  assert math.isnan(r["per_class"][3]["IoU"]) and math.isnan(r["per_class"][3]["Acc"])
  assert r["per_class"][3]["name"] == "3"
  assert abs(r["mIoU"] - 100 * 5 / 9) < 1e-9
  assert abs(r["mAcc"] - 75.0) < 1e-9
  assert abs(r["aAcc"] - 70.0) < 1e-9


def test_class_absent_but_predicted_has_iou_zero_acc_nan():
  # GT is all class 0: 2 right, 1 predicted as class 1.
  # class 0: IoU 2 / (3 + 2 - 2) = 2/3, Acc 2/3; class 1: IoU 0 / 1 = 0, Acc 0/0 = NaN.
  r = metrics.segmentation_metrics(np.array([[2, 1], [0, 0]]))
  assert r["per_class"][1]["IoU"] == 0.0 and math.isnan(r["per_class"][1]["Acc"])
  assert abs(r["mIoU"] - 100 / 3) < 1e-9  # (2/3 + 0) / 2
  assert abs(r["mAcc"] - 200 / 3) < 1e-9  # NaN excluded
  assert abs(r["aAcc"] - 200 / 3) < 1e-9


def test_empty_confusion_matrix_is_all_nan_without_warnings(recwarn):
  r = metrics.segmentation_metrics(np.zeros((2, 2), np.int64))
  assert math.isnan(r["mIoU"]) and math.isnan(r["mAcc"]) and math.isnan(r["aAcc"])
  assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_wrong_number_of_class_names():
  with pytest.raises(ValueError, match="2 class names for a 3-class confusion matrix"):
    metrics.segmentation_metrics(HAND_CONF, ["a", "b"])


def _numpy_confusion(pred, label, k, ignore):
  conf = np.zeros((k, k), np.int64)
  for p, t in zip(pred.ravel(), label.ravel()):
    if t != ignore and 0 <= t < k and 0 <= p < k:
      conf[t, p] += 1
  return conf


@pytest.mark.parametrize("k,dtype", [(5, np.int32), (150, np.uint8)])
def test_confusion_matrix_matches_numpy_on_random_data(k, dtype):
  rng = np.random.default_rng(k)
  label = rng.integers(0, k, (2, 17, 23))
  label[rng.random(label.shape) < 0.2] = 255  # ignore
  label[rng.random(label.shape) < 0.05] = k + 3  # out of range: dropped, not miscounted
  label = label.astype(dtype)  # uint8 labels: label * K must not wrap around
  pred = rng.integers(0, k, label.shape).astype(np.int32)
  conf = jax.jit(metrics.confusion_matrix, static_argnums=(2, 3))(pred, label, k, 255)
  np.testing.assert_array_equal(np.asarray(conf), _numpy_confusion(pred, label, k, 255))


def test_confusion_matrix_shape_mismatch():
  with pytest.raises(ValueError, match=r"pred shape \(2, 3\) != label shape \(3, 2\)"):
    metrics.confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int), 3)


def test_to_json_round_trip(tmp_path):
  conf = np.zeros((4, 4), np.int64)
  conf[:3, :3] = HAND_CONF
  r = metrics.segmentation_metrics(conf, ["a", "b", "c", "d"])
  path = tmp_path / "metrics.json"
  text = metrics.to_json(r, str(path))
  loaded = json.loads(path.read_text())  # strict JSON: NaN became null
  assert loaded == json.loads(text)
  assert loaded["per_class"][3] == {"name": "d", "IoU": None, "Acc": None}
  assert loaded["mIoU"] == r["mIoU"]
  back = metrics.from_json(text)
  assert back["per_class"][:3] == r["per_class"][:3]
  assert math.isnan(back["per_class"][3]["IoU"]) and math.isnan(back["per_class"][3]["Acc"])
  assert (back["mIoU"], back["mAcc"], back["aAcc"]) == (r["mIoU"], r["mAcc"], r["aAcc"])


def test_format_table():
  conf = np.zeros((4, 4), np.int64)
  conf[:3, :3] = HAND_CONF
  table = metrics.format_table(metrics.segmentation_metrics(conf, ["wall", "b", "c", "sky"]))
  lines = table.splitlines()
  assert lines[0] == "| Class |    IoU |    Acc |"
  assert lines[2] == "| wall  |  60.00 |  75.00 |"
  assert lines[5] == "| sky   |    nan |    nan |"
  assert lines[-1] == "aAcc: 70.00  mIoU: 55.56  mAcc: 75.00"


def _reduce_zero_label(raw: np.ndarray) -> np.ndarray:
  """mmseg's LoadAnnotations(reduce_zero_label=True): 0 -> 255, v -> v - 1, 255 stays 255."""
  label = raw.astype(np.int64)
  return np.where((label == 0) | (label == 255), 255, label - 1)


def test_metric_path_matches_per_class_masks_in_numpy():
  # 6 classes after reduction; raw values 5 and 6 never occur, so classes 4 and 5 are absent
  # from the ground truth. Class 4 is predicted (IoU 0, Acc NaN), class 5 never is (NaN).
  np.testing.assert_array_equal(_reduce_zero_label(np.array([0, 1, 2, 6, 255], np.uint8)),
                                [255, 0, 1, 5, 255])
  k, rng = 6, np.random.default_rng(7)
  conf_fn = jax.jit(metrics.confusion_matrix, static_argnums=(2, 3))
  conf = np.zeros((k, k), np.int64)
  intersect, union, area_label = np.zeros(k), np.zeros(k), np.zeros(k)
  for _ in range(4):
    raw = rng.choice(np.array([0, 1, 2, 3, 4, 255], np.uint8), size=(2, 19, 23))
    label = _reduce_zero_label(raw).astype(np.uint8)  # as the data pipeline stores it
    pred = rng.integers(0, 5, raw.shape)  # 0..4: class 5 is never predicted
    pred = np.where(rng.random(raw.shape) < 0.5, np.where(label == 255, pred, label), pred)
    conf += np.asarray(conf_fn(pred, label, k, 255), np.int64)
    valid = label != 255
    for c in range(k):
      in_label, in_pred = label == c, (pred == c) & valid
      intersect[c] += np.sum(in_label & in_pred)
      union[c] += np.sum(in_label | in_pred)
      area_label[c] += np.sum(in_label)
  assert area_label[4] == area_label[5] == 0 and union[4] > 0 and union[5] == 0
  with np.errstate(divide="ignore", invalid="ignore"):
    iou, acc = 100 * intersect / union, 100 * intersect / area_label
  a_acc = 100 * intersect.sum() / area_label.sum()
  r = metrics.segmentation_metrics(conf)
  assert abs(r["mIoU"] - np.mean(iou[:5])) < 1e-9  # class 5 (NaN) left out, class 4 (0) in
  assert abs(r["mAcc"] - np.mean(acc[:4])) < 1e-9
  assert abs(r["aAcc"] - a_acc) < 1e-9
  for c, row in enumerate(r["per_class"]):
    for got, want in ((row["IoU"], iou[c]), (row["Acc"], acc[c])):
      assert (math.isnan(got) and math.isnan(want)) or abs(got - want) < 1e-9
  assert r["per_class"][4]["IoU"] == 0.0 and math.isnan(r["per_class"][4]["Acc"])
  assert math.isnan(r["per_class"][5]["IoU"]) and math.isnan(r["per_class"][5]["Acc"])


def _cell_colours(picture: np.ndarray, layout, n: int) -> np.ndarray:
  """(n, n, 3) colours sampled in the cells of a confusion picture, beside their numbers."""
  ys, xs = zip(*[layout.corner(i, j) for i in range(n) for j in range(n)])
  return picture[np.array(ys), np.array(xs)].reshape(n, n, 3)


def test_confusion_picture_colour_ramp():
  np.testing.assert_array_equal(pictures._ramp(np.array([0.0, 1.0, np.nan])),
                                [[255, 255, 255], pictures._DARK, pictures._NO_PIXELS])
  darkness = pictures._ramp(np.linspace(0, 1, 11)).astype(int).sum(-1)
  assert np.all(np.diff(darkness) < 0)


def test_confusion_picture_diagonal_is_darkest_and_empty_row_grey():
  names = ["wall", "building", "sky", "a very long class name indeed"]
  conf = np.diag([5, 100, 0, 7])  # row 2 (sky) has no ground-truth pixels
  picture = pictures.confusion_picture(conf, names)
  layout = pictures.confusion_layout(conf, names)
  assert layout.names == tuple(names)  # not cut
  assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
  assert picture.shape[:2] == (layout.height, layout.width)
  assert layout.height == layout.top + max(4 * layout.cell, 5 * pictures._line_height()) + 4
  cells = _cell_colours(picture, layout, 4)
  want = np.zeros((4, 4, 3), np.uint8) + 255
  want[[0, 1, 3], [0, 1, 3]] = pictures._DARK  # every row normalised: 5/5 = 100/100 = 7/7
  want[2] = pictures._NO_PIXELS
  np.testing.assert_array_equal(cells, want)
  # A non-diagonal row: shares 3/4 and 1/4 of the row's pixels.
  conf = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 1]])
  cells = _cell_colours(pictures.confusion_picture(conf, names[:3]),
                        pictures.confusion_layout(conf, names[:3]), 3)
  np.testing.assert_array_equal(cells[0], pictures._ramp(np.array([0.75, 0.25, 0.0])))
  sums = cells.astype(int).sum(-1)
  assert np.all(sums.argmin(axis=1) == np.arange(3))


def test_confusion_picture_keeps_most_confused_classes():
  k, rng = 150, np.random.default_rng(0)
  conf = rng.integers(0, 50, (k, k)) * (rng.random((k, k)) < 0.1)
  conf[np.arange(k), np.arange(k)] += rng.permutation(k) * 100  # diagonal: no confusion
  off = conf.sum(axis=0) + conf.sum(axis=1) - 2 * np.diagonal(conf)
  assert np.sort(off)[-20] > np.sort(off)[-21]  # no tie at the cut
  want = np.sort(np.argsort(-off, kind="stable")[:20])
  shown = pictures.most_confused(conf, 20)
  np.testing.assert_array_equal(shown, want)
  assert off[shown].min() > np.delete(off, shown).max()
  # Ties go to the lower id; no more classes than top_k: all of them.
  np.testing.assert_array_equal(pictures.most_confused(np.array(
      [[1, 0, 0, 0], [2, 0, 0, 0], [0, 0, 0, 2], [0, 0, 0, 0]]), 2), [0, 1])
  np.testing.assert_array_equal(pictures.most_confused(np.eye(3), 20), [0, 1, 2])
  names = [f"class{i}" for i in range(k)]
  picture = pictures.confusion_picture(conf, names)
  layout = pictures.confusion_layout(conf, names)
  assert layout.shown == tuple(want) and layout.names == tuple(names[i] for i in want)
  share = conf[np.ix_(want, want)] / conf.sum(axis=1)[want, None]  # over all of the row
  np.testing.assert_array_equal(_cell_colours(picture, layout, 20), pictures._ramp(share))
  assert "20 most confused of 150 classes" in pictures.confusion_title(150, 20, 10)[0]
  assert pictures.confusion_title(4, 4, 10)[0] == "Confusion matrix, 4 classes (10 px)"


def test_format_table_shows_class_count_variants():
  r = metrics.segmentation_metrics(HAND_CONF, ["a", "b", "c"])
  r.update({"mIoU3": r["mIoU"], "mIoU2": 12.345})
  assert metrics.format_table(r).splitlines()[-1] == "mIoU2: 12.35  mIoU3: 55.56"


def test_one_table_for_semantic_panoptic_and_instance_results():
  """`format_table` prints every task's results from their keys alone (eval.py never asks the
  task): a semantic result, a panoptic one (PQ and AP, a NaN and a JSON null, a stuff class
  without AP) and an instance one (AP only), each in full."""
  semantic = metrics.segmentation_metrics(HAND_CONF, ["road", "sky", "cat"])
  semantic.update({"mIoU3": semantic["mIoU"], "mIoU2": 50.0})
  assert metrics.format_table(semantic) == "\n".join([
      "| Class |    IoU |    Acc |",
      "|-------|--------|--------|",
      "| road  |  60.00 |  75.00 |",
      "| sky   |  40.00 |  50.00 |",
      "| cat   |  66.67 | 100.00 |",
      "aAcc: 70.00  mIoU: 55.56  mAcc: 75.00",
      "mIoU2: 50.00  mIoU3: 55.56"])

  nan = float("nan")
  ap = {"AP": 30.0, "AP50": 55.5, "AP75": 20.0, "APs": nan, "APm": 10.0, "APl": 45.0}
  person = {"name": "person", "isthing": True, "PQ": 40.0, "SQ": 80.0, "RQ": 50.0, "TP": 1,
            "FP": 1, "FN": 1, "AP": 30.0}
  sky = {"name": "sky", "isthing": False, "PQ": 60.0, "SQ": 70.0, "RQ": None, "TP": 1,
         "FP": 0, "FN": 0}
  panoptic = {"PQ": 50.0, "SQ": 75.0, "RQ": 200 / 3, "PQ_th": 40.0, "SQ_th": 80.0,
              "RQ_th": 50.0, "PQ_st": 60.0, "SQ_st": 70.0, "RQ_st": nan,
              "PQ_classes": {"all": 2, "things": 1, "stuff": 1}, **ap,
              "per_class": [person, sky], "images": 3}
  assert metrics.format_table(panoptic) == "\n".join([
      "| Class  | Kind  |     PQ |     SQ |     RQ |     AP |",
      "|--------|-------|--------|--------|--------|--------|",
      "| person | thing |  40.00 |  80.00 |  50.00 |  30.00 |",
      "| sky    | stuff |  60.00 |  70.00 |    nan |      - |",
      "",
      "|        |     PQ |     SQ |     RQ |   N |",
      "|--------|--------|--------|--------|-----|",
      "| All    |  50.00 |  75.00 |  66.67 |   2 |",
      "| Things |  40.00 |  80.00 |  50.00 |   1 |",
      "| Stuff  |  60.00 |  70.00 |    nan |   1 |",
      "AP: 30.00  AP50: 55.50  AP75: 20.00  APs: nan  APm: 10.00  APl: 45.00",
      "PQ: 50.00  PQ_th: 40.00  PQ_st: 60.00"])

  instance = {**ap, "per_class": [{"name": "person", "isthing": True, "AP": 30.0},
                                  {"name": "sky", "isthing": False}]}
  assert metrics.format_table(instance) == "\n".join([
      "| Class  | Kind  |     AP |",
      "|--------|-------|--------|",
      "| person | thing |  30.00 |",
      "| sky    | stuff |      - |",
      "AP: 30.00  AP50: 55.50  AP75: 20.00  APs: nan  APm: 10.00  APl: 45.00"])
