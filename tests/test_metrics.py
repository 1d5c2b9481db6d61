"""Metrics on hand-computed cases and against a numpy confusion matrix."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from segvit_jax import metrics

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
