"""Where a jitted training step (or forward pass) spends its time, per model part: a jax
profiler trace of a few steps, its op events summed by the module path XLA records for each
op (the `op_name` metadata of the compiled program), largest first.

  python benchmarks/op_profile.py --model segformer_b5 [--size 320] [--batch 2] [--what train]
      [--steps 3] [--depth 4] [--top 30] [--dtype float32|bfloat16]

`--what train` profiles the trainer's step of benchmarks/train_step.py (forward, loss,
backward, AdamW), `forward` the inference forward pass of benchmarks/models.py. `--depth`
keeps that many trailing components of the path (digits folded: block_3_1 -> block_#_#), so
that the repeated blocks add up; "transpose(jvp(...))" in a path is the backward pass. The
table is how BENCHMARKS.md's training-step work found its targets (a convolution's kernel
gradient, a major-axis reduction, the class-major cross-entropy).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import models as bm  # noqa: E402
from benchmarks import train_step as ts  # noqa: E402
from segvit_jax.models import build_model  # noqa: E402


def op_paths(compiled_text: str) -> dict[str, str]:
  """HLO instruction name -> its op_name metadata, from a compiled program's text."""
  paths = {}
  for line in compiled_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}", line)
    if m:
      op = re.search(r'op_name="([^"]*)"', m.group(2))
      paths.setdefault(m.group(1), op.group(1) if op else "?")
  return paths


def op_times(trace_dir: str) -> collections.Counter:
  """Summed durations (us) of the complete events of the newest trace under `trace_dir`, by
  event name (the HLO op name where the event carries none in its args)."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  data = json.load(gzip.open(max(files, key=os.path.getmtime)))
  events = data["traceEvents"] if isinstance(data, dict) else data
  times = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      times[(e.get("args") or {}).get("hlo_op", e["name"])] += e["dur"]
  return times


def by_path(times: collections.Counter, paths: dict[str, str], depth: int
            ) -> collections.Counter:
  """Times of the program's ops summed by the last `depth` components of their path."""
  out = collections.Counter()
  for name, t in times.items():
    if name in paths:
      out["/".join(re.sub(r"\d+", "#", paths[name]).split("/")[-depth:])] += t
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, choices=list(bm.MODELS))
  parser.add_argument("--size", type=int, default=None, help="default: half the paper's")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--what", default="train", choices=("train", "forward"))
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--top", type=int, default=30)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args = parser.parse_args()
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()

  size = args.size or bm.MODELS[args.model][1] // 2
  c = ts.train_config(args.model, size)
  model = build_model(c.model)
  variables = bm.init_variables(c, size)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((args.batch, size, size, 3)), jnp.float32)
  if args.what == "train":
    labels = jnp.asarray(rng.integers(0, c.model.num_classes, (args.batch, size, size)),
                         jnp.int32)
    step, state = ts.our_step(c, variables, args.dtype)
    batch = {"image": images, "label": labels}
    compiled = step.lower(state, batch).compile()

    def run():
      nonlocal state
      state, loss = step(state, batch)
      return loss
  else:
    fn = jax.jit(lambda v, x: model.apply(v, x))
    compiled = fn.lower(variables, images).compile()
    run = lambda: fn(variables, images)  # noqa: E731
  jax.block_until_ready(run())  # compile + warm up
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(args.steps):
        jax.block_until_ready(run())
    wall = (time.perf_counter() - t0) / args.steps
    times = by_path(op_times(tmp), op_paths(compiled.as_text()), args.depth)
  total = sum(times.values()) / args.steps / 1e3
  print(f"{args.model} at {size}, batch {args.batch}, {args.what}, {args.dtype}: "
        f"{wall:.3f} s per step under the profiler, {total:.0f} ms in the program's ops")
  print("| ms / step | share | module path (last components) |")
  print("|---|---|---|")
  for path, t in times.most_common(args.top):
    ms = t / args.steps / 1e3
    print(f"| {ms:.1f} | {ms / total:.1%} | {path} |")


if __name__ == "__main__":
  main()
