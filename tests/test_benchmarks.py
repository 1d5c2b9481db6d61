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


def test_accelerator_smoke(tmp_path):
  """`benchmarks/accelerator.py --smoke`: every item measured on its config's :smoke model
  (CPU: XLA attention only, no peak memory or MFU), the table printed and written, the JSON."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from benchmarks import accelerator as acc  # pylint: disable=g-import-not-at-top
  # (a budget no busy test machine reaches: nothing is skipped)
  proc = subprocess.run([sys.executable, "benchmarks/accelerator.py", "--smoke", "--out",
                         str(tmp_path), "--budget", "3000"], capture_output=True, text=True,
                        timeout=3000)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads((tmp_path / "accelerator.json").read_text())
  rows = result["rows"]
  assert result["machine"]["smoke"] and result["machine"]["peak_tflops"] is None
  # Training first (its children start before this process holds device memory).
  assert [(r["task"], r["model"]) for r in rows] == [
      (i.task, i.name) for task in ("training", "inference") for i in acc.ITEMS
      if i.task == task]
  for r in rows:
    assert r["attention"] == "xla" and r["notes"] == [], r  # nothing skipped, nothing failed
    assert r["size"] == acc.SMOKE_SIZE
    if r["task"] == "inference":
      assert r["fps"] > 0 and r["best_batch"] in (1, 2) and r["gmacs"] > 0
      assert r["remat"] == ("-" if "SegFormer" in r["model"] else "off")
    else:
      assert r["images_per_s"] > 0 and r["tflops"] > 0 and r["finite"]
      assert r["mfu"] is None and r["peak_mib"] is None and r["batch"] == 2
  table = (tmp_path / "accelerator.md").read_text()
  assert table.strip() in proc.stdout
  lines = table.splitlines()
  assert any(line.startswith("| EoMT-L COCO panoptic | 64 | xla | off | off |")
             for line in lines)  # inference
  assert any(line.startswith("| EoMT-L COCO panoptic | 64 | 2 | xla | off | off |")
             for line in lines)  # training, at batch 2
  assert any(line.startswith("| SegFormer-B0 ADE20K | 64 | xla | - | - |") for line in lines)


def test_accelerator_budget_skips_what_does_not_fit():
  from benchmarks import accelerator as acc  # pylint: disable=g-import-not-at-top
  budget = acc.Budget(10.0, {"inference": 30.0, "training": 60.0})
  rows = acc.inference_rows(acc.ITEMS[0], ["cudnn", "xla"], budget, 10.0, 1.0, smoke=True)
  assert [r["attention"] for r in rows] == ["cudnn", "xla"]
  assert rows[0]["notes"][0].startswith("skipped: ~37 s needed, ")  # 30 x 1.2 + 1
  budget.record("inference", 2.0)  # a compile seen: the estimate follows it
  assert budget.estimate("inference", 1.0) == 2.0 * 1.2 + 1.0
  assert "skipped" in acc.training_rows(acc.ITEMS[1], ["xla"], budget, 1.0, True)[0]["notes"][0]


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
