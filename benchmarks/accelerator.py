"""The whole accelerator measurement in one command, within a time budget (8 minutes by default).

  python benchmarks/accelerator.py [--smoke] [--out DIR] [--budget SECONDS]

On one GPU (or a TPU host), in bfloat16, random weights, models built from the real configs:
  inference  batch-1 FPS and the best batch's images/s (batches BATCHES tried while images/s
             still grows by MIN_GAIN) of EoMT-L 640 (COCO panoptic) and 512 (ADE20K), EoMT-S / B
             640, SegFormer-B0 / B5 512, SegViT ViT-B 512, ViT-L 640 and Shrunk ViT-L 640: the
             jitted forward pass on device-resident images, parameters cast to bfloat16 (what
             is timed is what benchmarks/models.py times: `models.our_model`);
  training   SegViT ViT-B 512 and EoMT-L 640 (COCO panoptic, masked attention on, as at the
             start of the annealing): images/s of the trainer's step (`train_step.our_step`:
             forward, loss, backward, AdamW) at the recipe's batch, the achieved TFLOP/s
             (`flops.train_step_flops`: 3x the analytic forward), the MFU against the device's
             dense bf16 peak (`flops.PEAK_TFLOPS`) and the peak device memory
             (`device.memory_stats()`), each (model, attention) in a process of its own so that
             the peak is its own.
Each row states the attention implementation (`config.model.attention`), remat and scan
settings it ran with. Where cuDNN's flash attention exists (`layers.cudnn_device`), inference
is measured with "cudnn" and "xla" and training with "auto" (cuDNN where it applies, masked
blocks on XLA) and "xla"; elsewhere "xla" alone.

Budget: the training items run first with their first attention setting (children started
before this process holds device memory), then the inference items in priority order (EoMT-L
640 first), then the training items' other setting; each inference item gets an equal share
of the time left for its batch search. A measurement is started only when
the estimate of its cost (its compilation: the longest of that kind so far, or the first
guess FIRST_GUESS_S; plus the timed calls) fits in the time left; what does not fit is skipped
and the table says so. Times are medians of calls repeated for about `--seconds` each
(at least MIN_ITERS); the first call (trace + compile) is reported apart.

Writes DIR/accelerator.md (the tables, also printed) and DIR/accelerator.json (every row and
the machine). `--smoke` runs the same code on each config's `:smoke` model at 64 px on a CPU
(tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# No up-front grab of 75% of the GPU: the training children need the memory the parent has not
# used, and their peak is then what they use.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import models as bm  # noqa: E402
from benchmarks import train_step as ts  # noqa: E402
from segvit_jax import flops  # noqa: E402
from segvit_jax.models import layers  # noqa: E402

DTYPE = "bfloat16"
BATCHES = (8, 32, 64)  # best-batch candidates, in order
SMOKE_BATCHES = (2,)
SMOKE_SIZE = 64
MIN_GAIN = 1.1  # a larger batch is tried only while images/s grows by 10%
MIN_ITERS = 3
FIRST_GUESS_S = {"inference": 45.0, "training": 120.0}  # compile + first call, before any is seen
SMOKE_GUESS_S = {"inference": 5.0, "training": 20.0}


@dataclasses.dataclass(frozen=True)
class Item:
  name: str
  config: str  # configs/X.py
  kind: str  # benchmarks.models.MODELS kinds: "segvit", "segformer", "eomt"
  size: int
  task: str  # "inference" or "training"
  paper: str = ""  # the paper's FPS and where it was measured


# Priority order (the budget may not reach the end).
ITEMS = (
    Item("EoMT-L COCO panoptic", "configs/eomt_vit_l_coco_panoptic.py", "eomt", 640,
         "inference", "128 (H100, EoMT Table 1)"),
    Item("SegViT ViT-B/16 ADE20K", "configs/segvit_vit_b16_ade20k.py", "segvit", 512,
         "training"),
    Item("EoMT-L COCO panoptic", "configs/eomt_vit_l_coco_panoptic.py", "eomt", 640,
         "training"),
    Item("EoMT-L ADE20K", "configs/eomt_vit_l_ade20k.py", "eomt", 512, "inference",
         "92 (H100, EoMT Table 1; sliding windows)"),
    Item("EoMT-S COCO panoptic", "configs/eomt_vit_s_coco_panoptic.py", "eomt", 640,
         "inference", "330 (H100, EoMT Table 1)"),
    Item("EoMT-B COCO panoptic", "configs/eomt_vit_b_coco_panoptic.py", "eomt", 640,
         "inference", "261 (H100, EoMT Table 1)"),
    Item("SegFormer-B0 ADE20K", "configs/segformer_b0_ade20k.py", "segformer", 512,
         "inference", "50.5 (V100, SegFormer Table 1; whole image)"),
    Item("SegFormer-B5 ADE20K", "configs/segformer_b5_ade20k.py", "segformer", 512,
         "inference", "9.8 (V100, SegFormer Table 1; whole image)"),
    Item("SegViT ViT-B/16 ADE20K", "configs/segvit_vit_b16_ade20k.py", "segvit", 512,
         "inference"),
    Item("SegViT ViT-L/16 ADE20K", "configs/segvit_vit_l16_ade20k.py", "segvit", 640,
         "inference"),
    Item("SegViT-Shrunk ViT-L/16 ADE20K", "configs/segvit_shrunk_vit_l16_ade20k.py", "segvit",
         640, "inference"),
)


class Budget:
  """The deadline, and the longest compile seen per kind of measurement (the estimate of the
  next one's)."""

  def __init__(self, seconds: float, guesses: dict[str, float]):
    self.deadline = time.monotonic() + seconds
    self.longest = dict(guesses)
    self.seen: dict[str, float] = {}

  def left(self) -> float:
    return self.deadline - time.monotonic()

  def estimate(self, task: str, timed_s: float) -> float:
    return self.seen.get(task, self.longest[task]) * 1.2 + timed_s

  def record(self, task: str, compile_s: float) -> None:
    self.seen[task] = max(self.seen.get(task, 0.0), compile_s)


def item_config(item: Item, smoke: bool):
  path = os.path.join(ROOT, item.config) + (":smoke" if smoke else "")
  size = SMOKE_SIZE if smoke else item.size
  return bm.load_model_config(path, item.kind, size), size


def knobs(c) -> dict[str, Any]:
  """The settings a row ran with: attention, remat (its policy, or "off") and scan of a ViT
  backbone (the ViT's defaults where the config leaves them out); an MiT has neither: "-"."""
  bb = c.model.backbone
  if c.model.name == "segformer" or bb.get("type") == "mit":
    return {"attention": c.model.attention, "remat": "-", "scan": "-"}
  return {"attention": c.model.attention,
          "remat": bb.get("remat_policy", "nothing_saveable") if bb.get("remat") else "off",
          "scan": "on" if bb.get("scan_layers") else "off"}


def measure(call: Callable[[], Any], seconds: float) -> dict[str, float]:
  """The first call (trace + compile + run), then about `seconds` of timed calls (at least
  MIN_ITERS): {"first_s", "compile_s", "step_s" (median), "iters"}."""
  first = bm.timed(call)
  probe = min(bm.timed(call) for _ in range(2))
  n = max(MIN_ITERS, int(seconds / max(probe, 1e-6)))
  times = [bm.timed(call) for _ in range(min(n, 200))]
  step = statistics.median(times)
  return {"first_s": first, "compile_s": max(first - step, 0.0), "step_s": step,
          "iters": len(times)}


def out_of_memory(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def short(e: Exception) -> str:
  text = f"{type(e).__name__}: {e}".strip().splitlines()
  return text[0][:160] if text else type(e).__name__


# ------------------------------------------------------------------------------------------
# Inference.

def inference_rows(item: Item, attentions: list[str], budget: Budget, share: float,
                   seconds: float, smoke: bool) -> list[dict[str, Any]]:
  """One row per attention setting: batch-1 FPS, the best batch and its images/s."""
  end = time.monotonic() + share
  need = budget.estimate("inference", seconds)
  if budget.left() < need:  # not even one measurement: nothing is built
    return [{"task": "inference", "model": item.name, "size": SMOKE_SIZE if smoke else item.size,
             "attention": attention, "paper_fps": item.paper,
             "notes": [f"skipped: ~{need:.0f} s needed, {budget.left():.0f} s left"]}
            for attention in attentions]
  c, size = item_config(item, smoke)
  variables = bm.init_variables(c, size)
  # Deployed inference runs bfloat16 parameters (one cast here, not one per call).
  variables = jax.tree.map(
      lambda v: v.astype(DTYPE) if jnp.issubdtype(v.dtype, jnp.floating) else v, variables)
  gmacs = bm.forward_gmacs(c, size)
  rng = np.random.default_rng(0)
  rows = []
  for attention in attentions:
    c.model.attention = attention
    row = {"task": "inference", "model": item.name, "size": size, **knobs(c),
           "gmacs": gmacs, "paper_fps": item.paper, "notes": []}
    rows.append(row)
    if budget.left() < budget.estimate("inference", seconds):
      row["notes"].append(f"skipped: ~{budget.estimate('inference', seconds):.0f} s needed, "
                          f"{budget.left():.0f} s left")
      continue
    fn = bm.our_model(c, variables, item.kind, DTYPE)
    best = None
    for batch in (1, *(SMOKE_BATCHES if smoke else BATCHES)):
      x = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
      need = budget.estimate("inference", seconds)
      if batch > 1 and time.monotonic() + need > min(end, budget.deadline):
        row["notes"].append(f"batch {batch} not tried: ~{need:.0f} s needed")
        break
      try:
        m = measure(lambda: fn(x), seconds)
      except Exception as e:  # noqa: BLE001 (an OOM or a kernel refusing: the row says which)
        row["notes"].append(f"batch {batch}: {'out of memory' if out_of_memory(e) else short(e)}")
        break
      budget.record("inference", m["compile_s"])
      rate = batch / m["step_s"]
      if batch == 1:
        row.update(fps=rate, latency_ms=1e3 * m["step_s"], compile_s=m["compile_s"])
      grew = best is None or rate >= best[1] * MIN_GAIN
      if best is None or rate > best[1]:
        best = (batch, rate)
      if not grew:
        break
    if best is not None:
      row.update(best_batch=best[0], images_per_s=best[1],
                 tflops=2 * gmacs * best[1] / 1e3)
    row["peak_mib"] = bm.peak_memory_mib()  # the process's so far: an upper bound
  return rows


# ------------------------------------------------------------------------------------------
# Training (a child process per (item, attention): its own peak memory).

def train_batch(c, batch: int, size: int) -> dict[str, jax.Array]:
  """Random images and a few rectangles of labels (panoptic: segment ids and their classes)."""
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
  k = c.model.num_classes
  panoptic = c.loss.name == "mask2former_panoptic"
  segments = 8
  labels = np.zeros((batch, size, size), np.int32)
  for b in range(batch):
    for j in range(6):
      y0, x0 = rng.integers(0, size - size // 4, 2)
      labels[b, y0:y0 + size // 3, x0:x0 + size // 3] = j + 1 if panoptic else rng.integers(k)
  labels[:, :2] = c.dataset.ignore_index
  out = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  if panoptic:
    out["segment_classes"] = jnp.asarray(rng.integers(0, k, (batch, segments)), jnp.int32)
  return out


def training_row(item: Item, attention: str, seconds: float, smoke: bool) -> dict[str, Any]:
  """The training step of `item` at its recipe's (global) batch on this one device, halved
  while it does not fit (what runs in the child)."""
  c, size = item_config(item, smoke)
  c.model.attention = attention
  c.augment.crop_size = (size, size)
  c.grad_accum_steps = 1
  notes = []
  while True:
    batch = int(c.batch_size)
    try:
      variables = bm.init_variables(c, size)
      step, state = ts.our_step(c, variables, DTYPE)
      del variables
      data = train_batch(c, batch, size)
      holder = [state]

      def call():
        holder[0], loss = step(holder[0], data)
        return jax.block_until_ready(loss)

      m = measure(call, seconds)
      break
    except Exception as e:  # noqa: BLE001
      if not out_of_memory(e) or batch == 1:
        raise
      notes.append(f"batch {batch}: out of memory")
      c.batch_size = batch // 2
      holder = state = step = data = None
  row = {"task": "training", "model": item.name, "size": size, "batch": batch, **knobs(c),
         "notes": notes}
  loss = float(call())
  achieved = flops.train_step_flops(c) / m["step_s"] / 1e12
  peak = bm.peak_tflops()
  row.update(images_per_s=batch / m["step_s"], step_s=m["step_s"], compile_s=m["compile_s"],
             tflops=achieved, mfu=peak and achieved / peak, peak_mib=bm.peak_memory_mib(),
             loss=loss, finite=bool(np.isfinite(loss)))
  return row


def training_rows(item: Item, attentions: list[str], budget: Budget, seconds: float,
                  smoke: bool) -> list[dict[str, Any]]:
  rows = []
  for attention in attentions:
    need = budget.estimate("training", seconds)
    if budget.left() < need:
      rows.append({"task": "training", "model": item.name, "attention": attention,
                   "notes": [f"skipped: ~{need:.0f} s needed, {budget.left():.0f} s left"]})
      continue
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(ITEMS.index(item)),
           "--attention", attention, "--seconds", str(seconds)]
    if smoke:
      cmd.append("--smoke")
    t0 = time.monotonic()
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(budget.left(), 1))
    except subprocess.TimeoutExpired:
      rows.append({"task": "training", "model": item.name, "attention": attention,
                   "notes": [f"stopped at the budget after {time.monotonic() - t0:.0f} s"]})
      continue
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode == 0 and found:
      row = json.loads(found[-1][len("RESULT "):])
      budget.record("training", time.monotonic() - t0)  # the child's start-up counts too
    else:
      last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
      row = {"task": "training", "model": item.name, "attention": attention,
             "notes": [f"failed (exit {proc.returncode}): {last}"]}
    rows.append(row)
  return rows


# ------------------------------------------------------------------------------------------
# Tables.

def fmt(value: Any, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def tables(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
  peak = machine["peak_tflops"]
  lines = [f"{machine['device']} x {machine['devices']}, jax {machine['jax']}, "
           f"{DTYPE}, {machine['date']}; budget {machine['budget_s']:.0f} s, took "
           f"{machine['took_s']:.0f} s", "",
           "| model | size | attention | remat | scan | FPS (batch 1) | ms | best batch | "
           "img/s | TFLOP/s | compile s | paper FPS | notes |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["task"] != "inference":
      continue
    lines.append(
        f"| {r['model']} | {r.get('size', '-')} | {r.get('attention', '-')} | "
        f"{r.get('remat', '-')} | {r.get('scan', '-')} | {fmt(r.get('fps'), '.1f')} | "
        f"{fmt(r.get('latency_ms'), '.2f')} | {r.get('best_batch', '-')} | "
        f"{fmt(r.get('images_per_s'), '.1f')} | {fmt(r.get('tflops'), '.1f')} | "
        f"{fmt(r.get('compile_s'), '.1f')} | {r.get('paper_fps') or '-'} | "
        f"{'; '.join(r.get('notes', [])) or '-'} |")
  lines += ["", f"| training | size | batch | attention | remat | scan | img/s | s / step | "
            f"TFLOP/s | MFU (peak {fmt(peak, '.0f')}) | peak memory GiB | compile s | notes |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["task"] != "training":
      continue
    mem = r.get("peak_mib")
    lines.append(
        f"| {r['model']} | {r.get('size', '-')} | {r.get('batch', '-')} | "
        f"{r.get('attention', '-')} | {r.get('remat', '-')} | {r.get('scan', '-')} | "
        f"{fmt(r.get('images_per_s'), '.1f')} | {fmt(r.get('step_s'), '.3f')} | "
        f"{fmt(r.get('tflops'), '.1f')} | {fmt(r.get('mfu'), '.1%')} | "
        f"{fmt(mem and mem / 1024, '.1f')} | {fmt(r.get('compile_s'), '.1f')} | "
        f"{'; '.join(r.get('notes', [])) or '-'} |")
  return "\n".join(lines)


def attention_settings(task: str) -> list[str]:
  """The settings measured: with cuDNN, inference "cudnn" and "xla", training "auto" and
  "xla" (EoMT's masked training blocks stay on XLA under "auto"); else "xla"."""
  if not layers.cudnn_device():
    return ["xla"]
  return ["cudnn", "xla"] if task == "inference" else ["auto", "xla"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true",
                      help="the same on the configs' :smoke models at 64 px (a CPU, seconds)")
  parser.add_argument("--out", default="accelerator_results", help="where the files go")
  parser.add_argument("--budget", type=float, default=None,
                      help="seconds for everything (default 480; --smoke 300)")
  parser.add_argument("--seconds", type=float, default=None,
                      help="timed calls per measurement, in seconds (default 1.5; --smoke 0)")
  parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--attention", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  seconds = args.seconds if args.seconds is not None else (0.0 if args.smoke else 1.5)
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # grain / trainer code reads absl flags
  if args.child is not None:
    row = training_row(ITEMS[args.child], args.attention, seconds, args.smoke)
    print("RESULT " + json.dumps(row), flush=True)
    return

  t0 = time.monotonic()
  budget_s = args.budget or (300.0 if args.smoke else 480.0)
  budget = Budget(budget_s, SMOKE_GUESS_S if args.smoke else FIRST_GUESS_S)
  os.makedirs(args.out, exist_ok=True)
  device = jax.devices()[0]
  machine = {"device": device.device_kind, "platform": device.platform,
             "devices": jax.device_count(), "jax": jax.__version__,
             "python": platform.python_version(), "cudnn": layers.cudnn_device(),
             "peak_tflops": bm.peak_tflops(), "budget_s": budget_s, "smoke": args.smoke,
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  print(f"{machine['device']} ({machine['platform']}), cuDNN flash attention: "
        f"{machine['cudnn']}; budget {budget_s:.0f} s", flush=True)
  rows = []
  training = [i for i in ITEMS if i.task == "training"]
  inference = [i for i in ITEMS if i.task == "inference"]
  first, rest = attention_settings("training")[:1], attention_settings("training")[1:]
  plan = ([(i, first) for i in training] + [(i, None) for i in inference] +
          [(i, rest) for i in training if rest])
  for n, (item, attentions) in enumerate(plan):
    if item.task == "inference":
      share = budget.left() / sum(1 for i, _ in plan[n:] if i.task == "inference")
      new = inference_rows(item, attention_settings("inference"), budget, share, seconds,
                           args.smoke)
    else:
      new = training_rows(item, attentions, budget, seconds, args.smoke)
    rows += new
    for r in new:
      print(f"  {r['task']} {r['model']} {r.get('attention')}: "
            f"{fmt(r.get('fps') or r.get('images_per_s'), '.1f')} "
            f"{'FPS' if r['task'] == 'inference' else 'img/s'} "
            f"{'; '.join(r.get('notes', []))} ({budget.left():.0f} s left)", flush=True)
  machine["took_s"] = time.monotonic() - t0
  table = tables(rows, machine)
  with open(os.path.join(args.out, "accelerator.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(args.out, "accelerator.json"), "w") as f:
    json.dump({"machine": machine, "rows": rows}, f, indent=1)
  print(table)
  print(f"wrote {args.out}/accelerator.md and accelerator.json")


if __name__ == "__main__":
  main()
