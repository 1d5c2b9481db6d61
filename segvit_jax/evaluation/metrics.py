"""Semantic-segmentation metrics from a confusion matrix (mIoU, mAcc, aAcc), as mmseg's
`IoUMetric` and scenic's `SegmentationModel` compute them (the papers' single-scale and
multi-scale mIoU in percent: SegViT Tables 1-3, SegFormer Table 2, EoMT Table 5).

The per-batch confusion matrix is computed on device (`confusion_matrix`, jit-friendly); the
caller sums the matrices over the dataset on the host in int64 (a per-batch int32 count cannot
overflow, a dataset-wide one can) and turns the total into numbers with
`segmentation_metrics`.

NaN convention (mmseg's `nanmean`): a class that never occurs in the ground truth and is never
predicted has IoU = Acc = NaN and is left out of mIoU / mAcc; a class absent from the ground
truth but predicted somewhere has IoU 0 (it only adds false positives) and Acc NaN. The result
dict keeps `float('nan')`; `to_json` writes those as `null` (strict JSON has no NaN) and
`from_json` reads them back as NaN.

The result dicts of every task (these, and the PQ / AP of `pq`, whose result keys `PQ_KEYS` /
`AP_KEYS` are named here) are written by `to_json` and printed by the one `format_table`.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The headline keys of panoptic / instance results (`pq.pq_results`, `pq.mask_ap`): PQ / SQ / RQ
# of All, Things (`_th`) and Stuff (`_st`); COCOeval's first six segm statistics, in its order.
PQ_KEYS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def confusion_matrix(pred: jax.Array, label: jax.Array, num_classes: int,
                     ignore_index: int = 255) -> jax.Array:
  """(K, K) int32 pixel counts, rows = ground-truth class, columns = predicted class.

  `pred` and `label` are integer maps of the same shape (any leading dims, e.g. (B, H, W)).
  Pixels whose label is `ignore_index` are not counted; neither are pixels whose label or
  prediction lies outside [0, K) (labels are validated by the data pipeline; dropping them here
  keeps a stray value from landing in another class's cell).
  """
  if pred.shape != label.shape:
    raise ValueError(f"pred shape {pred.shape} != label shape {label.shape}")
  k = num_classes
  # int32 before `label * K`: a uint8 label map would wrap around.
  pred = jnp.asarray(pred).astype(jnp.int32).reshape(-1)
  label = jnp.asarray(label).astype(jnp.int32).reshape(-1)
  valid = ((label != ignore_index) & (label >= 0) & (label < k) & (pred >= 0) & (pred < k))
  index = jnp.where(valid, label * k + pred, 0)
  counts = jnp.bincount(index, weights=valid.astype(jnp.int32), length=k * k)
  return counts.astype(jnp.int32).reshape(k, k)


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """num / den in float64 with 0 / 0 = NaN and no warning."""
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.asarray(num, np.float64) / np.asarray(den, np.float64)


def nanmean(x: np.ndarray) -> float:
  """Mean over the non-NaN entries; NaN (without a warning) when there are none."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slice -> NaN, said once here
    return float(np.nanmean(x)) if x.size else float("nan")


def segmentation_metrics(conf: np.ndarray,
                         class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """mIoU / mAcc / aAcc (percent) and per-class IoU / Acc from a (K, K) confusion matrix.

  IoU_c = TP_c / (GT_c + Pred_c - TP_c), Acc_c = TP_c / GT_c, aAcc = sum(TP) / sum(GT); mIoU and
  mAcc are NaN-means over classes (see the module docstring for when a class is NaN).

  Returns {"mIoU", "mAcc", "aAcc": float, "per_class": [{"name", "IoU", "Acc"}, ...]}, plain
  Python floats and strings.
  """
  conf = np.asarray(conf, np.int64)
  if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
    raise ValueError(f"confusion matrix must be square (K, K), got shape {conf.shape}")
  k = conf.shape[0]
  if class_names is None:
    class_names = [str(i) for i in range(k)]
  if len(class_names) != k:
    raise ValueError(f"{len(class_names)} class names for a {k}-class confusion matrix")
  intersect = np.diag(conf)
  area_label = conf.sum(axis=1)
  area_pred = conf.sum(axis=0)
  iou = _divide(intersect, area_label + area_pred - intersect) * 100.0
  acc = _divide(intersect, area_label) * 100.0
  a_acc = _divide(intersect.sum(), area_label.sum()) * 100.0
  return {
      "mIoU": nanmean(iou),
      "mAcc": nanmean(acc),
      "aAcc": float(a_acc),
      "per_class": [{"name": str(name), "IoU": float(i), "Acc": float(a)}
                    for name, i, a in zip(class_names, iou, acc)],
  }


def _nan_to_none(x: Any) -> Any:
  if isinstance(x, dict):
    return {key: _nan_to_none(v) for key, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_nan_to_none(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return None if math.isnan(x) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def _none_to_nan(x: Any) -> Any:
  if isinstance(x, dict):
    return {key: _none_to_nan(v) for key, v in x.items()}
  if isinstance(x, list):
    return [_none_to_nan(v) for v in x]
  return float("nan") if x is None else x


def to_json(results: dict[str, Any], path: str | None = None, indent: int | None = 2) -> str:
  """Strict JSON text of a metrics dict, NaN written as `null`; also written to `path` if
  given. Numpy scalars become Python numbers."""
  text = json.dumps(_nan_to_none(results), indent=indent, allow_nan=False)
  if path is not None:
    with open(path, "w") as f:
      f.write(text + "\n")
  return text


def from_json(text: str) -> dict[str, Any]:
  """Inverse of `to_json`: every `null` is read back as NaN (metrics never hold a real None)."""
  return _none_to_nan(json.loads(text))


def _fmt(x: float | None) -> str:
  return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def format_table(results: dict[str, Any]) -> str:
  """The results of any task as text (percent, 2 decimals, NaN as 'nan'): the per-class table
  (IoU / Acc; PQ / SQ / RQ and AP, with a thing / stuff column where the classes carry
  `isthing`; '-' where a class has no value), then the summaries of the metrics present:
  aAcc / mIoU / mAcc (and mIoU59-style class-count variants), the PQ / SQ / RQ table of All /
  Things / Stuff (panopticapi's summary), the AP line (COCOeval's) and the PQ line."""
  rows = results.get("per_class", [])
  cols = ((["IoU", "Acc"] if "mIoU" in results else []) + (["PQ", "SQ", "RQ"] if "PQ" in results
          else []) + (["AP"] if "AP" in results else []))
  kinds = any("isthing" in r for r in rows)
  width = max([len("Class")] + [len(r["name"]) for r in rows])
  kind_head, kind_rule = ("| Kind  ", "|-------") if kinds else ("", "")
  lines = [f"| {'Class':<{width}} {kind_head}| " + " | ".join(f"{c:>6}" for c in cols) + " |",
           f"|{'-' * (width + 2)}{kind_rule}|" + "|".join("-" * 8 for _ in cols) + "|"]
  for r in rows:
    kind = ("| thing " if r.get("isthing", True) else "| stuff ") if kinds else ""
    lines.append(f"| {r['name']:<{width}} {kind}| "
                 + " | ".join(f"{_fmt(r[c]) if c in r else '-':>6}" for c in cols) + " |")
  if "mIoU" in results:
    lines.append(f"aAcc: {_fmt(results['aAcc'])}  mIoU: {_fmt(results['mIoU'])}  "
                 f"mAcc: {_fmt(results['mAcc'])}")
    variants = sorted(k for k in results if re.fullmatch(r"mIoU\d+", k))  # e.g. mIoU59, mIoU60
    if variants:
      lines.append("  ".join(f"{k}: {_fmt(results[k])}" for k in variants))
  if "PQ" in results:
    n = results.get("PQ_classes", {})
    lines.append("")
    lines.append("|        |     PQ |     SQ |     RQ |   N |")
    lines.append("|--------|--------|--------|--------|-----|")
    for label, suffix, key in (("All", "", "all"), ("Things", "_th", "things"),
                               ("Stuff", "_st", "stuff")):
      lines.append(f"| {label:<6} | " + " | ".join(
          f"{_fmt(results[k + suffix]):>6}" for k in ("PQ", "SQ", "RQ"))
          + f" | {n.get(key, 0):>3} |")
  if "AP" in results:
    lines.append("  ".join(f"{k}: {_fmt(results[k])}" for k in AP_KEYS))
  if "PQ" in results:
    lines.append(f"PQ: {_fmt(results['PQ'])}  PQ_th: {_fmt(results['PQ_th'])}  "
                 f"PQ_st: {_fmt(results['PQ_st'])}")
  return "\n".join(lines)
