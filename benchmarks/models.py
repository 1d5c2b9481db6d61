"""Inference latency (batch 1) and throughput, ours against the PyTorch implementation of the
same model with the same weights, side by side in one run.

  python benchmarks/models.py [--models segvit_b16,segformer_b0,...] [--full] [--repeats 5]
      [--batch 4] [--dtype float32|bfloat16] [--no-torch] [--peak-tflops T]

Models and their PyTorch counterparts (weights moved by our exporters, so both sides compute
the same function; the first call checks the outputs agree):
  segvit_b16, segvit_l16   SegViT (ATM head): the package's PyTorch SegViT
                           (`segvit_jax.torch.from_bundle`, the bundle's weights)
  shrunk_l16               SegViT-Shrunk: the same, its SegViTShrunk
  segformer_b0, b5         transformers SegformerForSemanticSegmentation from `--to hf-segformer`
  eomt_s, eomt_l           transformers EomtForUniversalSegmentation from `--to hf-eomt`
                           (COCO panoptic set-up: 200 queries, 133 classes)
Sizes: the papers' (`--full`: 512 / 640, EoMT 640) or half of them (default, for a CPU). Ours is
one jitted function per shape; its first call (tracing + compilation) is reported apart.
Times are medians over `--repeats` runs, ours and torch alternating so that load on the machine
hits both alike. The outputs compared and timed are what each implementation returns from its
forward pass: SegViT semantic scores at the input size, SegFormer logits at 1/4, EoMT class
and mask logits at 1/4 (ours computes nothing else: the rest of our output dict is dead code
under jit).

A second table gives what an accelerator run needs: the analytic forward multiply-adds per
image (`segvit_jax.flops`, the papers' "GFLOPs", interpolation not counted), ours' FPS at
batch 1 and images/s at the throughput batch, the achieved TFLOP/s (2 FLOPs per multiply-add),
the model FLOPs utilisation (MFU: achieved / the device's dense bf16 peak, from
`segvit_jax.flops.PEAK_TFLOPS` by device kind or --peak-tflops) and the device's peak memory.
`--no-torch` leaves PyTorch out (on a GPU or TPU machine whose torch is a CPU build; the
side-by-side columns then read "-").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from segvit_jax import bundle, config_utils, convert, flops  # noqa: E402
from segvit_jax.models import build_model  # noqa: E402

try:  # the PyTorch side; an accelerator machine may have no torch (benchmarks/accelerator.py)
  import torch  # noqa: E402

  from segvit_jax import torch as segvit_torch  # noqa: E402
except ImportError:
  torch = segvit_torch = None

# name: (config, full size, what is compared)
MODELS = {
    "segvit_b16": ("configs/segvit_vit_b16_ade20k.py", 512, "segvit"),
    "segvit_l16": ("configs/segvit_vit_l16_ade20k.py", 640, "segvit"),
    "shrunk_l16": ("configs/segvit_shrunk_vit_l16_ade20k.py", 640, "segvit"),
    "segformer_b0": ("configs/segformer_b0_ade20k.py", 512, "segformer"),
    "segformer_b5": ("configs/segformer_b5_ade20k.py", 640, "segformer"),
    "eomt_s": ("S", 640, "eomt"),
    "eomt_l": ("L", 640, "eomt"),
}


def peak_tflops(override: float | None = None) -> float | None:
  """The device's dense bf16 peak: `override`, else `flops.PEAK_TFLOPS` by device kind, else
  None."""
  if override:
    return override
  return flops.peak_tflops(jax.devices()[0].device_kind, "bfloat16")


def peak_memory_mib() -> float | None:
  """Peak bytes in use on device 0 (GPU / TPU memory_stats), None where not reported."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def forward_gmacs(c, size: int) -> float:
  """Analytic forward multiply-adds (G) of one size x size image: what the papers call
  "GFLOPs"; the hardware does 2 FLOPs per multiply-add."""
  return flops.count_model(c.model, size, size)["total"] / 1e9


def fmt(value: float | None, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def model_config(name: str, size: int):
  """The model config of a benchmark entry at input `size` (stored grids resized to it)."""
  spec, _, kind = MODELS[name]
  # EoMT: the COCO panoptic recipe (200 queries, 133 classes).
  path = f"configs/eomt_vit_{spec.lower()}_coco_panoptic.py" if kind == "eomt" else spec
  return load_model_config(path, kind, size)


def load_model_config(path: str, kind: str, size: int):
  """The run config of config file `path` (`configs/X.py[:ARG]`; `kind`: "segvit", "segformer"
  or "eomt") for size x size inputs: float32, stored position / query grids at size / 16."""
  c = config_utils.load_config(path)
  m = c.model
  m.dtype = "float32"
  if kind == "segvit":
    m.backbone.posemb_grid = (size // 16, size // 16)
    if m.head.get("type") == "shrunk":
      m.head.query_grid = (size // 16, size // 16)
  if kind == "eomt":
    m.backbone.posemb_grid = (size // 16, size // 16)
    m.backbone.posemb_resize = "bicubic"  # transformers' (its grid is fixed)
  return c


def init_variables(c, size: int) -> Any:
  """Random variables (seed 0) of `c.model` for size x size inputs."""
  model = build_model(c.model)
  x0 = jnp.zeros((1, size, size, 3), jnp.float32)
  return jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(0), x0)))()


def export(c, variables, tmp: str, kind: str) -> str:
  """Our weights where the PyTorch implementation reads them: the bundle (SegViT), or its
  transformers directory written by our exporter."""
  path = bundle.save_bundle(os.path.join(tmp, "bundle"), variables["params"], c.model,
                            mean=c.mean, std=c.std,
                            class_names=[f"c{i}" for i in range(c.model.num_classes)],
                            model_state={k: v for k, v in variables.items() if k != "params"})
  if kind == "segvit":
    return path
  fmt = {"segformer": "hf-segformer", "eomt": "hf-eomt"}[kind]
  return convert.export(path, os.path.join(tmp, "torch_dir"), fmt)


def torch_module(path: str, kind: str) -> torch.nn.Module:
  """The PyTorch counterpart with the exported weights (eval mode)."""
  import transformers  # pylint: disable=g-import-not-at-top
  if kind == "segformer":
    return transformers.SegformerForSemanticSegmentation.from_pretrained(path).eval()
  if kind == "eomt":
    return transformers.EomtForUniversalSegmentation.from_pretrained(path).eval()
  return segvit_torch.from_bundle(path).eval()


def torch_model(path: str, kind: str) -> Callable[[torch.Tensor], Any]:
  """(forward on NCHW float32 images -> the compared outputs) of the PyTorch counterpart."""
  model = torch_module(path, kind)
  if kind == "segformer":
    return lambda x: model(pixel_values=x).logits
  if kind == "eomt":
    def run(x):
      out = model(pixel_values=x)
      return out.class_queries_logits, out.masks_queries_logits
    return run
  return lambda x: model(x)["semantic_scores"]


def our_model(c, variables, kind: str, dtype) -> Callable[[jax.Array], Any]:
  m = c.model.to_dict()
  m["dtype"] = dtype
  model = build_model(m)

  def run(v, x):
    out = model.apply(v, x)
    if kind == "segvit":
      return out["semantic_scores"]
    if kind == "segformer":
      return out["logits"]
    return out["class_logits"], out["mask_logits"]

  fn = jax.jit(run)
  return lambda x: jax.block_until_ready(fn(variables, x))


def timed(fn: Callable[[], Any]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def compare(ours, theirs) -> float:
  """Max abs difference of the outputs (tuples compared element-wise)."""
  ours = ours if isinstance(ours, tuple) else (ours,)
  theirs = theirs if isinstance(theirs, tuple) else (theirs,)
  return max(float(np.max(np.abs(np.asarray(a, np.float32) - t.detach().numpy())))
             for a, t in zip(ours, theirs))


def bench(name: str, size: int, batch: int, repeats: int, dtype: str,
          with_torch: bool = True) -> dict:
  c = model_config(name, size)
  kind = MODELS[name][2]
  variables = init_variables(c, size)
  theirs = None
  if with_torch:
    with tempfile.TemporaryDirectory() as tmp:
      path = export(c, variables, tmp, kind)
      theirs = torch_model(path, kind)
  ours = our_model(c, variables, kind, dtype)
  rng = np.random.default_rng(0)
  row = {"model": name, "size": size}
  for b, key in ((1, "latency"), (batch, "throughput")):
    x = rng.standard_normal((b, size, size, 3)).astype(np.float32)
    xj, xt = jnp.asarray(x), torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    first = timed(lambda: ours(xj))  # trace + compile + run
    with torch.inference_mode():
      if theirs is not None:
        theirs(xt)  # warm-up
        if b == 1:
          row["max_diff"] = compare(ours(xj), theirs(xt))
      t_ours, t_torch = [], []
      for _ in range(repeats):
        t_ours.append(timed(lambda: ours(xj)))
        if theirs is not None:
          t_torch.append(timed(lambda: theirs(xt)))
    row[f"{key}_ours"] = statistics.median(t_ours)
    row[f"{key}_torch"] = statistics.median(t_torch) if t_torch else None
    if b == 1:
      row["compile_s"] = first - row["latency_ours"]
  row["batch"] = batch
  row["gmacs"] = forward_gmacs(c, size)
  row["peak_mib"] = peak_memory_mib()
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--full", action="store_true", help="the papers' sizes")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch", type=int, default=4, help="batch of the throughput rows")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--no-torch", action="store_true", help="ours alone")
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="the device's peak TFLOP/s for MFU (default: flops.PEAK_TFLOPS)")
  args = parser.parse_args()
  torch.set_grad_enabled(False)
  peak = peak_tflops(args.peak_tflops)
  print(f"{jax.devices()[0].device_kind} x {jax.local_device_count()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__};"
        f" ours in {args.dtype}, torch float32; medians of {args.repeats}")
  print("| model | size | ours ms (batch 1) | torch ms | ours / torch | ours img/s (batch "
        f"{args.batch}) | torch img/s | ours / torch time | compile s | max abs diff |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  rows = []
  for name in args.models.split(","):
    full = MODELS[name][1]
    size = full if args.full else full // 2
    r = bench(name, size, args.batch, args.repeats, args.dtype, not args.no_torch)
    rows.append(r)
    b, lt, tt = r["batch"], r["latency_torch"], r["throughput_torch"]
    print(f"| {name} | {size} | {1e3 * r['latency_ours']:.0f} | {fmt(lt and 1e3 * lt, '.0f')} "
          f"| {fmt(lt and r['latency_ours'] / lt, '.2f')} | {b / r['throughput_ours']:.2f} | "
          f"{fmt(tt and b / tt, '.2f')} | {fmt(tt and r['throughput_ours'] / tt, '.2f')}"
          f" | {r['compile_s']:.1f} | {fmt(r.get('max_diff'), '.1e')} |", flush=True)
  print(f"\n| model | size | GMACs / img | ours FPS (batch 1) | ours img/s (batch {args.batch})"
        f" | TFLOP/s (batch {args.batch}) | MFU (peak {fmt(peak, '.0f')}) | peak memory MiB |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    achieved = 2 * r["gmacs"] * r["batch"] / r["throughput_ours"] / 1e3
    print(f"| {r['model']} | {r['size']} | {r['gmacs']:.1f} | {1 / r['latency_ours']:.1f} | "
          f"{r['batch'] / r['throughput_ours']:.2f} | {achieved:.3f} | "
          f"{fmt(peak and achieved / peak, '.1%')} | {fmt(r['peak_mib'], '.0f')} |")


if __name__ == "__main__":
  main()
