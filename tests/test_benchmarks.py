"""The benchmark scripts' pieces on a tiny input: they run, both sides agree, the helpers."""

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
