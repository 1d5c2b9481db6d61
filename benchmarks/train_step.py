"""Training step time, ours against the PyTorch implementation of the same model with the same
weights, side by side in one run.

  python benchmarks/train_step.py [--models segvit_b16,segformer_b0,...] [--full]
      [--batch 2] [--repeats 5] [--dtype float32|bfloat16] [--no-torch] [--peak-tflops T]

A step is forward, loss, backward and the AdamW update on one batch of random images and
labels: ours is the trainer's jitted step (`trainer.loss_fn` + `accumulated_value_and_grad` +
the config's optimizer), torch's is forward, loss, `backward()` and `torch.optim.AdamW.step()`
(eager, float32). Losses: SegViT's ATM loss (ours; the torch reference's `atm_loss` from the
tests), SegFormer's pixel cross-entropy (transformers computes it from `labels`), EoMT's
Mask2Former loss (transformers' EomtLoss from `mask_labels` / `class_labels`, its Hungarian
matching on the host with scipy; ours in the jitted step; 1000 points per mask there and here
instead of 12544, to keep a CPU run short). Sizes as benchmarks/models.py. Medians over
`--repeats` rounds; ours' first step (compilation) is reported apart. A round is two steps of
ours, then two of torch, the second of each timed: a step straight after the other framework's
took up to 1.5x as long for both (SegFormer-B5: ours 3.1 s alone, 3.1-4.7 s alternating).
The last columns: the achieved TFLOP/s of ours, counting a training step as 3x the analytic
forward pass (6 FLOPs per forward multiply-add and image, the usual convention: the backward
pass costs two forward passes), the MFU against the device's dense bf16 peak and the device's
peak memory (benchmarks/models.py; "-" where unknown). `--no-torch` times ours alone. Each
model runs in a process of its own (an L model's two training states need most of 24 GiB).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks import models as bm  # noqa: E402
from segvit_jax import optim, trainer  # noqa: E402
from segvit_jax.models import build_model  # noqa: E402

try:  # the PyTorch side; an accelerator machine may have no torch (benchmarks/accelerator.py)
  import torch  # noqa: E402
  from tests import torch_reference as ref  # noqa: E402
except ImportError:
  torch = ref = None

NUM_POINTS = 1000


def train_config(name: str, size: int):
  """The run config of a benchmark entry trained at size x size crops (EoMT: NUM_POINTS points
  per mask, no masked attention, as transformers' model trains here)."""
  c = bm.model_config(name, size)
  c.augment.crop_size = (size, size)
  if bm.MODELS[name][2] == "eomt":
    c.loss.num_points = NUM_POINTS
    c.model.mask_annealing.enabled = False  # transformers' masking is off (probs 0) too
  return c


def our_step(c, variables, dtype: str):
  """(jitted step(state, batch) -> (state, loss), initial state)."""
  c.model.dtype = dtype
  model = build_model(c.model)
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  tx, _ = optim.make_optimizer(c.optim, c.total_steps, params)
  value_and_grad = trainer.accumulated_value_and_grad(trainer.loss_fn(model, c), c)

  def step(state, batch):
    params, opt_state, model_state, t = state
    (loss, (_, model_state)), grads = value_and_grad(params, model_state, batch,
                                                     jax.random.key(0), t)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, model_state, t + 1), loss

  state = (params, tx.init(params), model_state, jnp.int32(c.optim.warmup_steps + 10))
  return jax.jit(step, donate_argnums=(0,)), state


def torch_step(c, path: str, kind: str):
  """step(images NCHW, labels (B, H, W) long) -> loss, for the PyTorch counterpart."""
  import transformers  # pylint: disable=g-import-not-at-top
  if kind == "eomt":  # transformers' loss, with our point count
    model = transformers.EomtForUniversalSegmentation.from_pretrained(
        path, train_num_points=NUM_POINTS).train()
  else:
    model = bm.torch_module(path, kind).train()
  k = c.model.num_classes
  if kind == "segformer":
    loss_fn = lambda x, y: model(pixel_values=x, labels=y).loss  # noqa: E731
  elif kind == "eomt":
    def loss_fn(x, y):
      masks, classes = [], []
      for label in y:
        present = [int(v) for v in torch.unique(label) if v < k]
        masks.append(torch.stack([(label == v).float() for v in present]))
        classes.append(torch.tensor(present))
      return model(pixel_values=x, mask_labels=masks, class_labels=classes).loss
  else:
    def loss_fn(x, y):
      out = model(x)
      final = {"class_logits": out["class_logits"], "mask_logits": out["mask_logits"]}
      return ref.atm_loss({**final, "aux_outputs": out["aux_outputs"]}, y, k)[0]
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)

  def step(x, y):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(x, y)
    loss.backward()
    opt.step()
    return float(loss)

  return step


def bench(name: str, size: int, batch: int, repeats: int, dtype: str,
          with_torch: bool = True) -> dict:
  c = train_config(name, size)
  kind = bm.MODELS[name][2]
  variables = bm.init_variables(c, size)
  theirs = None
  if with_torch:
    with tempfile.TemporaryDirectory() as tmp:
      path = bm.export(c, variables, tmp, kind)
      theirs = torch_step(c, path, kind)
  step, state = our_step(c, variables, dtype)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
  # Labels: a few rectangles of random classes, some ignore pixels.
  labels = np.full((batch, size, size), 0, np.int32)
  k = c.model.num_classes
  for b in range(batch):
    for _ in range(6):
      y0, x0_ = rng.integers(0, size - 8, 2)
      labels[b, y0:y0 + size // 3, x0_:x0_ + size // 3] = rng.integers(0, k)
  labels[:, :4] = 255
  batch_j = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  xt = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  yt = torch.from_numpy(labels).long()
  holder = [state]

  def ours_step() -> float:
    t0 = time.perf_counter()
    holder[0], loss = step(holder[0], batch_j)
    jax.block_until_ready(loss)
    return time.perf_counter() - t0

  first = ours_step()
  t_ours, t_torch = [], []
  sides = [(ours_step, t_ours)]
  if theirs is not None:
    sides.append((lambda: bm.timed(lambda: theirs(xt, yt)), t_torch))
  for _ in range(repeats):
    for run, times in sides:
      run()  # a step to settle in after the other framework's (memory, caches)
      times.append(run())
  ours = statistics.median(t_ours)
  torch_s = statistics.median(t_torch) if t_torch else None
  return {"model": name, "size": size, "batch": batch, "ours": ours, "torch": torch_s,
          "compile": first - ours, "gmacs": bm.forward_gmacs(c, size),
          "peak_mib": bm.peak_memory_mib()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(bm.MODELS))
  parser.add_argument("--full", action="store_true", help="the papers' sizes")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--no-torch", action="store_true", help="ours alone")
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="the device's peak TFLOP/s for MFU (default: flops.PEAK_TFLOPS)")
  parser.add_argument("--row", action="store_true", help=argparse.SUPPRESS)  # one model, no header
  args = parser.parse_args()
  names = args.models.split(",")
  if not args.row:
    print(f"{jax.devices()[0].device_kind} x {jax.local_device_count()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); ours {args.dtype}; "
          f"batch {args.batch}; medians of {args.repeats}")
    print("| model | size | ours s / step | torch s / step | ours / torch | compile s | "
          f"ours TFLOP/s | MFU (peak {bm.fmt(bm.peak_tflops(args.peak_tflops), '.0f')}) | "
          "peak memory MiB |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    if len(names) > 1:
      # One process per model: two optimizers' states and the previous models' leftovers do
      # not fit beside an L model in 24 GiB, and a model that fails leaves the others' rows.
      for name in names:
        proc = subprocess.run([sys.executable, __file__, "--models", name, "--row",
                               *_without_models(sys.argv[1:])], capture_output=True, text=True)
        rows = [line for line in proc.stdout.splitlines() if line.startswith(f"| {name} ")]
        print(rows[-1] if rows and proc.returncode == 0 else
              f"| {name} | failed (exit {proc.returncode}): "
              f"{(proc.stderr.strip().splitlines() or ['no output'])[-1][:200]} |", flush=True)
      return
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  peak = bm.peak_tflops(args.peak_tflops)
  name = names[0]
  full = bm.MODELS[name][1]
  size = full if args.full else full // 2
  r = bench(name, size, args.batch, args.repeats, args.dtype, not args.no_torch)
  achieved = 6 * r["gmacs"] * r["batch"] / r["ours"] / 1e3
  theirs = r["torch"]
  print(f"| {name} | {size} | {r['ours']:.2f} | {bm.fmt(theirs, '.2f')} | "
        f"{bm.fmt(theirs and r['ours'] / theirs, '.2f')} | {r['compile']:.1f} | "
        f"{achieved:.3f} | {bm.fmt(peak and achieved / peak, '.1%')} | "
        f"{bm.fmt(r['peak_mib'], '.0f')} |", flush=True)


def _without_models(argv: list[str]) -> list[str]:
  """`argv` less its --models option (either spelling)."""
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
    elif arg == "--models":
      skip = True
    elif not arg.startswith("--models="):
      out.append(arg)
  return out


if __name__ == "__main__":
  main()
