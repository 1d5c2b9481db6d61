"""The benchmark scripts' pieces on a tiny input: they run, both sides agree, the helpers."""

import pytest

from benchmarks import compile_time as ct
from benchmarks import models as bm
from benchmarks import train_step as ts


def test_inference_bench_runs_both_sides_on_the_same_weights():
  row = bm.bench("segformer_b0", 64, batch=2, repeats=1, dtype="float32")
  assert row["max_diff"] < 1e-4  # ours and transformers' SegFormer, our exported weights
  assert row["latency_ours"] > 0 and row["throughput_torch"] > 0
  # B0 at 512 is 8.4 "GFLOPs" (multiply-adds) in the paper; at 64, 1/64 of the pixels.
  assert 0.05 < row["gmacs"] < 0.3
  assert bm.peak_memory_mib() is None  # the CPU reports none


def test_helpers():
  assert bm.peak_tflops(123.0) == 123.0
  assert bm.fmt(None, ".2f") == "-" and bm.fmt(0.5, ".1%") == "50.0%"
  assert ts._without_models(["--models", "a,b", "--full", "--models=c", "--batch", "2"]) == [
      "--full", "--batch", "2"]


def test_compile_time_table_and_the_configs_without_scan():
  row = lambda scan, t: {"config": "x", "scan": scan, "train_lower": (t, 1.0),  # noqa: E731
                         "train_compile": (t, t), "step_gib": 2.0, "eval_program": "slide",
                         "eval_lower": (1.0, 1.0), "eval_compile": (t, t), "peak_rss_gib": 3.0}
  lines = ct.table([row(False, 9.0), row(True, 4.0),
                    {"config": "y", "scan": True, "error": "ValueError: no"}]).splitlines()
  # CPU s (wall s); totals against the unrolled row: (1 + 4) / (1 + 9), 5 / 10.
  assert lines[3] == ("| x | True | 1.0 (4) | 4.0 (4) | 5.0 (8) | 0.50 | 2.0 | slide | 1.0 (1) "
                      "| 4.0 (4) | 5.0 (5) | 0.50 | 3.00 |")
  assert lines[4] == "| y | True | n/a: ValueError: no |"
  with pytest.raises(ValueError, match="scan_layers is not implemented for SegFormer's MiT"):
    ct.load_config("segformer_b5_ade20k", True, smoke=True)
  assert "scan_layers" not in ct.load_config("segformer_b5_ade20k", False, True).model.backbone
  for scan in (False, True):
    assert ct.load_config("segvit_vit_l16_ade20k", scan, True).model.backbone.scan_layers is scan
