"""Compile time of the full-size configs' train step and evaluation program, `scan_layers` off
and on, side by side in one run.

  python benchmarks/compile_time.py [--configs segvit_vit_l16_ade20k,...] [--smoke]

Per config (default: SegViT ViT-L/16 640, EoMT-L 640 COCO panoptic, SegFormer-B5 640) and
setting of `model.backbone.scan_layers`, in a fresh process (no compilation cache, nothing
compiled before): the trainer's own train step (`trainer.train_program`, the config's batch,
crop, loss and optimizer on one device), lowered from its abstract state and batch and compiled,
as train.py does before its first step; then the evaluation's model program (the predictor's
`lower`: the config's test protocol on one ADE20K-like 512 x 683 image, COCO-like 480 x 640 for
COCO: the windows its test resize gives, in one call), lowered from abstract parameters. No
parameter is ever materialised: the peak resident memory column is what tracing, lowering and
compiling need. Times are CPU seconds of the process (all its threads; the wall seconds in
brackets): on a machine whose cores are shared the CPU seconds are the steadier measure. A
model without the knob (SegFormer's MiT) or refusing it (EoMT, whose query
blocks differ from the others and whose layer-wise lr decay needs per-block parameters) gets a
row saying why. `--smoke` runs the configs' smoke variants.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from segvit_jax import models, sharding, trainer  # noqa: E402
from segvit_jax.data import transforms  # noqa: E402
from segvit_jax.evaluation import panoptic, semantic  # noqa: E402

CONFIGS = ("segvit_vit_l16_ade20k", "eomt_vit_l_coco_panoptic", "segformer_b5_ade20k")
# The image whose test-time windows the evaluation program is compiled for (H, W): ADE20K's
# most common size, COCO's.
SAMPLE_SIZE = {"coco_panoptic": (480, 640)}
DEFAULT_SAMPLE_SIZE = (512, 683)


def load_config(name: str, scan: bool, smoke: bool):
  c = importlib.import_module(f"configs.{name}").get_config("smoke" if smoke else "")
  if scan and models.family(c.model) == "segformer":
    raise ValueError("scan_layers is not implemented for SegFormer's MiT encoder")
  if scan or "scan_layers" in c.model.backbone:
    c.model.backbone.scan_layers = scan  # EoMT refuses it (module docstring)
  return c


def eval_program(c, model, variables):
  """(lowered model program of one sample image's windows, what it is)."""
  ev = c.eval
  h, w = SAMPLE_SIZE.get(c.dataset.name, DEFAULT_SAMPLE_SIZE)
  size = transforms.test_size(h, w, ev.resize, tuple(ev.scale), 1.0, int(ev.size_divisor),
                              int(ev.min_size))
  if ev.task == "semantic":
    predictor = semantic.make_predictor(model, {}, c)
    window, starts = predictor.layout(*size)
    n = predictor.chunk_sizes(len(starts) * (2 if ev.flip else 1))[0]
    what = f"{ev.mode}: {n} x {window[0]}x{window[1]}"
    return predictor.lower(variables, n, window), what
  predictor = panoptic.make_mask_predictor(model, {}, c)
  s0, s1 = predictor.input_size
  return predictor.lower(variables, 1), f"{ev.mode}: 1 x {s0}x{s1}"


class Clock:
  """Wall and CPU seconds (all threads of the process) since the last `lap`: on a machine whose
  cores are shared the CPU seconds are the steadier measure."""

  def __init__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()

  def lap(self) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = (wall - self.wall, cpu - self.cpu)
    self.wall, self.cpu = wall, cpu
    return out


def measure(name: str, scan: bool, smoke: bool = False) -> dict:
  """Wall and CPU seconds to lower and to compile the train step and the evaluation program of
  config `name` with `scan_layers` = `scan`, the compiled step's memory (XLA's analysis) and
  the process's peak RSS."""
  c = load_config(name, scan, smoke)
  mesh = sharding.make_mesh(c.mesh)
  row = {"config": name, "scan": scan}
  clock = Clock()
  program = trainer.train_program(c, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    lowered = program.step.lower(program.abstract_state, trainer.abstract_batch(c, mesh))
    row["train_lower"] = clock.lap()
    compiled = lowered.compile()
    row["train_compile"] = clock.lap()
  row["step_gib"] = trainer.compiled_memory(compiled)["total"] / 2**30
  del lowered, compiled
  variables = nn.meta.unbox(jax.eval_shape(
      lambda: program.model.init(jax.random.key(0), jnp.zeros(trainer.input_shape(c)))))
  clock.lap()
  lowered, row["eval_program"] = eval_program(c, program.model, variables)
  row["eval_lower"] = clock.lap()
  lowered.compile()
  row["eval_compile"] = clock.lap()
  row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return row


def run_isolated(name: str, scan: bool, smoke: bool) -> dict:
  """`measure` in a fresh process (no program compiled or cached before it); a failure is a
  row with the exception line it raised."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  args = [sys.executable, os.path.abspath(__file__), "--one", name, "--scan", str(int(scan))]
  proc = subprocess.run(args + (["--smoke"] if smoke else []), capture_output=True, text=True,
                        env=env)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("ROW ")]
  if proc.returncode == 0 and lines:
    return json.loads(lines[-1].removeprefix("ROW "))
  stderr = proc.stderr.strip().splitlines() or ["no output"]
  raised = [l for l in stderr if re.match(r"[\w.]+(Error|Exception): ", l)]
  return {"config": name, "scan": scan, "error": (raised or stderr)[-1][:160]}


def table(rows: list[dict]) -> str:
  """The Markdown table of `measure` rows: CPU seconds (wall in brackets) of lowering and
  compiling, their total against the unrolled row of the same config."""
  out = ["| config | scan_layers | train step: lower s | compile s | total s | x unrolled | "
         "step memory GiB | eval program | lower s | compile s | total s | x unrolled | "
         "peak RSS GiB |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  base = {}
  sec = lambda t: f"{t[1]:.1f} ({t[0]:.0f})"  # noqa: E731
  for r in rows:
    if "error" in r:
      out.append(f"| {r['config']} | {r['scan']} | n/a: {r['error']} |")
      continue
    train = [a + b for a, b in zip(r["train_lower"], r["train_compile"])]
    ev = [a + b for a, b in zip(r["eval_lower"], r["eval_compile"])]
    if not r["scan"]:
      base[r["config"]] = (train[1], ev[1])
    ref = base.get(r["config"])
    ratio = lambda t, i: f"{t[1] / ref[i]:.2f}" if ref else "-"  # noqa: E731
    out.append(f"| {r['config']} | {r['scan']} | {sec(r['train_lower'])} | "
               f"{sec(r['train_compile'])} | {sec(train)} | {ratio(train, 0)} | "
               f"{r['step_gib']:.1f} | {r['eval_program']} | {sec(r['eval_lower'])} | "
               f"{sec(r['eval_compile'])} | {sec(ev)} | {ratio(ev, 1)} | "
               f"{r['peak_rss_gib']:.2f} |")
  return "\n".join(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--smoke", action="store_true", help="the configs' smoke variants")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # one measurement, in this process
  parser.add_argument("--scan", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    print("ROW " + json.dumps(measure(args.one, bool(args.scan), args.smoke)), flush=True)
    return
  print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, jax {jax.__version__}; "
        f"{'smoke variants' if args.smoke else 'full-size configs'}", flush=True)
  rows = []
  for name in args.configs.split(","):
    for scan in (False, True):
      rows.append(run_isolated(name, scan, args.smoke))
      print("ROW " + json.dumps(rows[-1]), flush=True)  # what a cut-short run measured
  print(table(rows))


if __name__ == "__main__":
  main()
