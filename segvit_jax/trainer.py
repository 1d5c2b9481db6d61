"""The training loop behind `train.py` (big_vision style, one readable function in commented
sections): data -> mesh -> model and optimizer shapes via `jax.eval_shape` -> shardings ->
jitted init with `out_shardings` -> jitted step with donated state, compiled once from shapes
-> resume -> loop. The loop's steps besides the train step itself (checking the loss, logging
a window of steps, evaluating and keeping the best) are the methods of `Loop`.

Resuming: rerunning with the same workdir restores the latest checkpoint (train state, step
and the data iterator position) and continues bit-identically. A checkpoint written by another
number of processes restores too: orbax reshards the train state onto this run's mesh, but the
data iterator state is per process and cannot be carried over, so the data order restarts from
a fresh per-process shuffle (with a warning).

Non-finite values: the jitted step checks its loss, gradient norm and updated state, and keeps
the state it was given when any is not finite (`keep_finite`), so no checkpoint ever holds a
non-finite value; the run then stops naming the step and the checkpoint a rerun resumes from.

Stopping: SIGTERM (a preemption notice) or SIGINT (Ctrl-C) ends the current step, saves a
checkpoint of it, closes the writers and exits with 128 + the signal number (143, 130;
`TrainingStopped`); several processes agree on the step through jax's preemption service
(`StopRequest`). A resumed run drops the metrics.jsonl records of steps after its checkpoint
and hides them in TensorBoard (`MetricsWriter`).

Gradient accumulation (`config.grad_accum_steps`): the global batch is split into micro-batches
inside the jitted step and their gradients are summed before the one optimizer update, so the
step equals the whole-batch step up to float rounding (see `accumulated_value_and_grad`).

Best parameters (`config.eval.best_metric`): after each evaluation during training, results
that beat the best so far are kept as a model bundle in WORKDIR/best/, with their record
{"step", "metric", "value"} in WORKDIR/best.json (`checkpoint.BestKeeper`). A resumed run reads
the record back, so it only replaces best/ with better parameters.

Throughput: each log line and metrics.jsonl entry carries steps/s, images/s, the achieved
TFLOP/s (`tflops`: the analytic FLOPs of one step, `flops.train_step_flops`, over the step
time) and, on devices of known peak (`flops.PEAK_TFLOPS`), the model FLOPs utilisation (`mfu`:
achieved / the peak of all the mesh's devices at the compute dtype).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from segvit_jax import bundle, checkpoint, convert, flops, losses, optim, runtime, sharding
from segvit_jax import config_check
from segvit_jax.data import pipeline, registry
from segvit_jax.models import build_model, training_inputs, vit


class NonFiniteLossError(FloatingPointError):
  """A train step met a non-finite loss, gradient norm or updated state (`NONFINITE`); the
  step's update was not applied and the run stopped."""


@flax.struct.dataclass
class TrainState:
  """`model_state`: the model's variable collections other than "params" that training
  updates without the optimizer, e.g. {"batch_stats": ...} of BatchNorm (SegFormer); {} for
  models without any."""
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any = dataclasses.field(default_factory=dict)


def model_state_of(variables: Any) -> dict:
  """The variable collections of a model other than "params" (e.g. batch_stats)."""
  return {k: v for k, v in variables.items() if k != "params"}


# `metrics["nonfinite"]` of a train step: 0 when its update was applied, else the first check
# that failed (`keep_finite`), and the state is the one before the step.
NONFINITE = {1: "loss", 2: "gradient norm", 3: "parameters / optimizer state after the update"}


def all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point value of `tree` is finite (integer leaves always are)."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def keep_finite(old: TrainState, new: TrainState, loss: jax.Array, grad_norm: jax.Array
                ) -> tuple[TrainState, jax.Array]:
  """(`new`, 0) when the loss, the gradient norm and every parameter, optimizer and model-state
  value of `new` are finite; otherwise (`old`, the code of the first failed check, `NONFINITE`).

  The updated state is checked, not only the loss: the loss is that of the parameters before
  the update, so a huge learning rate can turn a finite loss into non-finite parameters, which
  a checkpoint of that step would then hold. Keeping the whole old state (its step included)
  means no saved state is ever non-finite.

  Inside the jitted step, one `lax.cond` picks the state: a select per value instead made XLA
  fuse the finiteness reductions with every select, and the smoke SegViT's train step took
  100 s to compile on the CPU instead of 15 s."""
  checks = (jnp.isfinite(loss), jnp.isfinite(grad_norm),
            all_finite((new.params, new.opt_state, new.model_state)))
  ok = checks[0] & checks[1] & checks[2]
  code = jnp.where(checks[0], jnp.where(checks[1], jnp.where(checks[2], 0, 3), 2), 1)
  state = jax.lax.cond(ok, lambda: new, lambda: old)
  return state, code.astype(jnp.int32)


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  h, w = config.augment.crop_size
  return (1, h, w, 3)


# Evaluation results logged during training (semantic; panoptic and instance).
EVAL_HEADLINES = ("mIoU", "mAcc", "aAcc", "PQ", "SQ", "RQ", "PQ_th", "PQ_st", "AP")
LOSS_RNG_STREAM = 0x10551  # fold_in index of the loss's own random stream


def loss_fn(model: nn.Module, config: ml_collections.ConfigDict) -> Callable:
  """(params, model_state, batch, rng, step) -> (loss, (terms, new model_state)) with the loss
  `config.loss.name` names (`segvit_jax.losses.LOSSES`). `model_state` (e.g. BatchNorm's
  batch_stats) is updated by the training-mode forward pass; {} stays {}. `step` feeds
  `models.training_inputs` (EoMT's mask annealing)."""
  loss, options = losses.get_loss(config.loss)

  def fn(params, model_state, batch, rng, step=None):
    variables = {"params": params, **model_state}
    kwargs = training_inputs(config.model, step)
    if model_state:
      out, new_state = model.apply(variables, batch["image"], train=True,
                                   rngs={"dropout": rng}, mutable=list(model_state), **kwargs)
    else:
      out, new_state = model.apply(variables, batch["image"], train=True,
                                   rngs={"dropout": rng}, **kwargs), {}
    extra = {}
    if loss.needs_rng:  # point sampling: a stream of its own, apart from dropout's
      extra["rng"] = jax.random.fold_in(rng, LOSS_RNG_STREAM)
    for key in loss.batch_keys:  # targets beyond the label map (panoptic segment classes)
      extra[key] = batch[key]
    total, terms = loss.fn(out, batch["label"], num_classes=config.model.num_classes,
                           ignore_index=config.dataset.ignore_index, **options, **extra)
    return total, (terms, dict(new_state))

  return fn


def split_micro_batches(batch: dict, steps: int,
                        sharding: jax.sharding.Sharding | None = None) -> dict:
  """(B, ...) -> (steps, B // steps, ...). Micro-batch i takes rows i, i + steps, ...: the batch
  is sharded over devices in contiguous blocks of rows, so every micro-batch keeps an equal
  part of each device's block and the split moves no data between devices."""
  def split(x):
    x = x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
  return jax.tree.map(split, batch)


def accumulated_value_and_grad(compute_loss: Callable, config: ml_collections.ConfigDict,
                               mesh: jax.sharding.Mesh | None = None,
                               grad_shardings: Any = None) -> Callable:
  """`jax.value_and_grad(compute_loss, has_aux=True)` over `config.grad_accum_steps`
  micro-batches: (params, model_state, batch, rng, step) -> ((loss, (terms, model_state)),
  grads) of the whole batch, for a `compute_loss` like `loss_fn`'s.

  The micro-batches run one after the other in a `lax.scan`, so only one micro-batch's
  activations are alive at a time. Each micro-batch's loss terms are weighted by its share of
  the whole batch's normalisers (the loss's `normalisers`, `segvit_jax.losses.Loss`) rather
  than by 1 / steps, which makes the sum over micro-batches the whole-batch loss (and
  gradient) exactly, up to float rounding; with equal shares the weights are 1 / steps. A
  term the loss has no normaliser for fails here rather than being mis-weighted. Dropout gets
  `fold_in(rng, i)` in micro-batch i; `model_state` (BatchNorm statistics) passes from one
  micro-batch to the next, as in a framework that accumulates over several forward passes.
  `grad_shardings` (the parameter shardings) keeps the gradient sum sharded like the
  parameters.
  """
  steps = int(config.grad_accum_steps)
  value_and_grad = jax.value_and_grad(compute_loss, has_aux=True)
  if steps == 1:
    return value_and_grad
  micro_sharding = None if mesh is None else NamedSharding(mesh, P(None, ("data", "fsdp")))
  loss, options = losses.get_loss(config.loss)
  k, ignore = config.model.num_classes, config.dataset.ignore_index

  def fn(params, model_state, batch, rng, step=None):
    micro = split_micro_batches(batch, steps, micro_sharding)
    # (steps,) counts. vmap, not a loop: on the CPU, a collective inside a loop can deadlock
    # with an independent one outside it (the parameters' all-gathers).
    # The loss's extra batch entries (panoptic segment classes) count too.
    counts = jax.vmap(lambda mb: loss.normalisers(
        mb["label"], k, ignore, options, **{key: mb[key] for key in loss.batch_keys}))(
            {key: micro[key] for key in ("label", *loss.batch_keys)})
    totals = jax.tree.map(lambda c: jnp.sum(c, axis=0), counts)

    def body(carry, xs):
      total_loss, total_terms, total_grads, state = carry
      i, micro_batch, count = xs

      def weighted_loss(p):
        _, (terms, new_state) = compute_loss(p, state, micro_batch, jax.random.fold_in(rng, i),
                                             step)
        scaled = {}
        for name, value in terms.items():
          key, floor = loss.term_normaliser(name)
          share = jnp.maximum(count[key], floor) / jnp.maximum(totals[key], floor)
          scaled[name] = value * share
        return sum(scaled.values()), (scaled, new_state)

      (value, (terms, state)), grads = jax.value_and_grad(weighted_loss, has_aux=True)(params)
      total_loss, total_terms, total_grads = jax.tree.map(
          jnp.add, (total_loss, total_terms, total_grads), (value, terms, grads))
      if grad_shardings is not None:
        total_grads = jax.lax.with_sharding_constraint(total_grads, grad_shardings)
      return (total_loss, total_terms, total_grads, state), None

    first = jax.tree.map(lambda x: x[0], micro)
    _, (terms_shape, _) = jax.eval_shape(compute_loss, params, model_state, first, rng, step)
    zero_terms = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), terms_shape)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    if grad_shardings is not None:
      zero_grads = jax.lax.with_sharding_constraint(zero_grads, grad_shardings)
    init = (jnp.zeros((), jnp.float32), zero_terms, zero_grads, model_state)
    (total, terms, grads, model_state), _ = jax.lax.scan(
        body, init, (jnp.arange(steps), micro, counts))
    return (total, (terms, model_state)), grads

  return fn


def abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict:
  """The global training batch as ShapeDtypeStructs (`pipeline.train_batch_spec`)."""
  sh = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((config.batch_size, *shape), dtype, sharding=sh)
          for k, (shape, dtype) in pipeline.train_batch_spec(config).items()}


def bytes_per_device(abstract_tree: Any, shardings: Any) -> int:
  """Bytes one device holds of `abstract_tree` laid out with `shardings` (a matching tree)."""
  return sum(int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)))


def format_bytes(n: int | None) -> str:
  if n is None:
    return "n/a"
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def compiled_memory(compiled: Any) -> dict[str, int | None]:
  """Per-device bytes of a compiled computation: arguments, outputs, temporaries and their
  total (arguments + outputs + temp - the outputs aliased to donated arguments); None where the
  backend does not say."""
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):  # backends without an analysis
    stats = None
  get = lambda name: None if stats is None else getattr(stats, f"{name}_size_in_bytes", None)
  out = {k: get(k) for k in ("argument", "output", "temp")}
  alias = get("alias")
  out["total"] = (None if None in out.values()
                  else out["argument"] + out["output"] + out["temp"] - (alias or 0))
  return out


def memory_log_line(compiled: Any, abstract_state: TrainState, state_sh: TrainState) -> str:
  m = compiled_memory(compiled)
  return ("memory per device: params %s, optimizer state %s | compiled train step: arguments "
          "%s, outputs %s, temp %s, total %s" % (
              format_bytes(bytes_per_device(abstract_state.params, state_sh.params)),
              format_bytes(bytes_per_device(abstract_state.opt_state, state_sh.opt_state)),
              *(format_bytes(m[k]) for k in ("argument", "output", "temp", "total"))))


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def drop_records_after(path: str, step: int) -> int:
  """Rewrites the JSON-lines file `path` keeping only its records of steps <= `step`, and
  returns how many it dropped (a line that does not parse, e.g. half-written by a killed run,
  counts as dropped). Atomic: a temporary file beside it, then a rename. No file: 0."""
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and isinstance(record.get("step"), int) and (
        record["step"] <= step):
      kept.append(line if line.endswith("\n") else line + "\n")
  if len(kept) < len(lines):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  return len(lines) - len(kept)


def summary_writer_class() -> type:
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch whenever
  it is installed, only to accept torch tensors (the trainer writes floats and NumPy arrays),
  and that import took 3.4 s of every training run's start on a 2-core CPU. A torch already
  imported is used as it is; a later `import torch` works as usual."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricsWriter:
  """Console + TensorBoard + `metrics.jsonl` (one JSON object per logged step), process 0.

  A run that starts at step `start` (resumed from its checkpoint) continues the records of
  steps <= `start`: those of later steps, logged by a run killed after its last checkpoint,
  are dropped from metrics.jsonl (`drop_records_after`) and hidden in TensorBoard, whose
  loader discards the events of steps >= `purge_step` written before a restart marker
  (tensorboardX's `purge_step`: the event files keep them, TensorBoard does not show them)."""

  def __init__(self, workdir: str, start: int = 0):
    self.active = jax.process_index() == 0
    self.tb = None
    if self.active:
      path = os.path.join(workdir, "metrics.jsonl")
      dropped = drop_records_after(path, start)
      if dropped:
        logging.info("%s: dropped %d record(s) of steps after %d, written by an earlier run "
                     "after its last checkpoint", path, dropped, start)
      self.tb = summary_writer_class()(os.path.join(workdir, "tb"), purge_step=start + 1)
      self.jsonl = open(path, "a")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()

  def images(self, step: int, images: dict[str, np.ndarray]) -> None:
    """(H, W, 3) uint8 pictures to TensorBoard's Images tab (not to metrics.jsonl)."""
    if not self.active:
      return
    for tag, image in images.items():
      self.tb.add_image(tag, image, step, dataformats="HWC")
    self.tb.flush()

  def close(self) -> None:
    if self.active:
      self.tb.close()
      self.jsonl.close()


class TrainingStopped(SystemExit):
  """`train` stopped on SIGTERM / SIGINT after saving a checkpoint of `step`. A SystemExit whose
  code is the shell's convention for a death by signal `signum`, 128 + signum (SIGTERM 143,
  SIGINT 130), so that `train.py` exits with it and a scheduler can tell a preempted run."""

  def __init__(self, signum: int, step: int):
    super().__init__(128 + signum)
    self.signum, self.step = signum, step


class StopRequest:
  """SIGTERM (a preemption notice) or SIGINT (Ctrl-C) asks the run to stop after its current
  step: the loop asks `due(step)` after each step, then saves that step and stops.

  One process: while installed (`with StopRequest():`), handlers of both signals record it; a
  second SIGINT raises KeyboardInterrupt at once. Several processes must stop at the same step,
  or a checkpoint misses some processes' part: with `jax.distributed` initialised, jax's
  preemption service agrees on it (`multihost_utils.reached_preemption_sync_point`: every
  process reaches the same step). Its notifier catches SIGTERM itself, so only SIGINT gets a
  handler here, which passes the request on to it as a SIGTERM to this process. Several
  processes without a distributed client (a TPU slice formed by its runtime) have no way to
  agree without a collective per step: the signals keep their defaults there (a warning says
  so)."""

  def __init__(self):
    self.signum: int | None = None
    self.multi = jax.process_count() > 1
    self.synced = (self.multi and jax.distributed.is_initialized()
                   and jax.config.jax_enable_preemption_service)
    self.previous: dict[int, Any] = {}

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is not threading.main_thread():
      return self  # signal handlers can only be set from the main thread
    if self.multi and not self.synced:
      logging.warning("%d processes without jax's preemption service (jax.distributed is not "
                      "initialised): SIGTERM / SIGINT stop the run without a checkpoint",
                      jax.process_count())
      return self
    for signum in (signal.SIGINT,) if self.synced else (signal.SIGTERM, signal.SIGINT):
      self.previous[signum] = signal.signal(signum, self.handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self.previous.items():
      signal.signal(signum, handler)
    self.previous = {}

  def handle(self, signum: int, frame: Any) -> None:
    del frame
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: now
    if self.signum is None:
      self.signum = signum
      print(f"{signal.Signals(signum).name}: stopping after the current step (a second "
            "Ctrl-C stops at once, without a checkpoint)", file=sys.stderr, flush=True)
    if self.synced:
      os.kill(os.getpid(), signal.SIGTERM)  # to jax's preemption notifier

  def due(self, step: int) -> bool:
    """Whether to stop after `step`: the same answer on every process. Call it once per step
    on every process (the preemption service counts steps)."""
    if self.synced:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signum is not None

  def stopped(self, step: int, ckpt_dir: str) -> TrainingStopped:
    """The exit of a run stopped after `step` (saved in `ckpt_dir`); one line on stderr."""
    signum = self.signum or signal.SIGTERM  # on another process: jax's preemption notice
    if jax.process_index() == 0:
      print(f"stopped by {signal.Signals(signum).name} after step {step}: checkpoint {step} "
            f"saved in {ckpt_dir}, metrics written; rerun the same command to resume from step "
            f"{step} (exit status {128 + signum})", file=sys.stderr, flush=True)
    return TrainingStopped(signum, step)


def is_due(step: int, every: int, total: int) -> bool:
  """Whether something done every `every` steps (and after the last) falls on `step`."""
  return step % every == 0 or step == total


@dataclasses.dataclass(frozen=True)
class Utilisation:
  """Achieved TFLOP/s and the model FLOPs utilisation of a step rate: `step_flops` (analytic
  FLOPs of one step, `flops.train_step_flops`) x steps/s, against `peak_tflops` (one device's,
  None where unknown: no MFU) x `num_devices`."""
  step_flops: int
  peak_tflops: float | None
  num_devices: int

  def scalars(self, steps_per_s: float) -> dict[str, float]:
    tflops = self.step_flops * steps_per_s / 1e12
    if not self.peak_tflops:
      return {"tflops": tflops}
    return {"tflops": tflops, "mfu": tflops / (self.peak_tflops * self.num_devices)}

  def describe(self) -> str:
    peak = ("no known peak: TFLOP/s, no MFU" if not self.peak_tflops else
            f"peak {self.peak_tflops:g} TFLOP/s x {self.num_devices} device(s)")
    return f"train step: {self.step_flops / 1e9:.4g} GFLOPs (analytic); {peak}"


def nonfinite_message(config: ml_collections.ConfigDict, step: int, code: int, loss: float,
                      grad_norm: float, resumable: int | None, ckpt_dir: str) -> str:
  """What a non-finite step (`NONFINITE` `code`) means: the step, the checkpoint a rerun
  resumes from (`resumable`: the latest saved, None without one) and what to change."""
  lr = config.optim.lr
  what = {1: f"loss ({loss})",
          2: f"gradient norm ({grad_norm}) with a finite loss ({loss})",
          3: f"{NONFINITE[3]} (loss {loss:.4g} and gradient norm {grad_norm:.4g} finite)"}[code]
  if resumable is None:
    where = "No checkpoint was saved before it: rerunning starts from step 0."
  else:
    where = (f"The last good checkpoint ({resumable}) in {ckpt_dir} holds only finite values: "
             f"rerunning the same command resumes from step {resumable}.")
  if code == 3:  # the update itself overflowed
    change = (f"Before rerunning, lower optim.lr (now {lr:g}) with --config.optim.lr=VALUE.")
  else:
    change = (f"Before rerunning, check the data of step {step}, lower optim.lr (now {lr:g}) "
              f"with --config.optim.lr=VALUE, or set --config.model.dtype=float32 (now "
              f"{config.model.get('dtype', 'float32')}).")
  return (f"non-finite {what} at step {step}: stopping; the update of step {step} was not "
          f"applied. {where} {change}")


# A loss term of an auxiliary (intermediate) prediction: `loss_ce_0`, `loss_dice_2` ...
_AUX_TERM = re.compile(r"_\d+$")
# The order the mask losses state their terms in (a step's metrics arrive sorted by name).
_TERM_ORDER = ("ce", "mask", "dice")


def headline_terms(scalars: dict[str, float]) -> dict[str, float]:
  """The loss terms of the final prediction, named without their `loss_` prefix: ce, mask,
  dice (in that order) of the ATM and Mask2Former losses, ce of the per-pixel one. The terms
  of auxiliary predictions (`loss_ce_0` ...) stay out: with them a line is ~300 characters;
  so does the window's mean loss `loss_avg`, a scalar of `Loop.log`, not a term."""
  terms = {k.removeprefix("loss_"): v for k, v in scalars.items()
           if k.startswith("loss_") and k != "loss_avg" and not _AUX_TERM.search(k)}
  known = {name: i for i, name in enumerate(_TERM_ORDER)}
  return {k: terms[k] for k in sorted(terms, key=lambda k: (known.get(k, len(known)), k))}


def short_number(v: float) -> str:
  """`v` in 4 characters below 100 ("0.12", "1.23", "12.3"), 3 significant digits above."""
  return f"{v:.2f}" if abs(v) < 10 else f"{v:.3g}"


def progress_line(step: int, total: int, scalars: dict[str, float], steps_per_s: float) -> str:
  """The console's progress line: step / total, loss with its headline terms, lr, speed and
  ETA, e.g. "step 100/3000 | loss 3.456 (ce 0.12 mask 1.23 dice 0.46) | lr 0.0006 | 5.23
  steps/s ETA 9m14s": at most ~96 characters at the demo's and the papers' schedules, 150
  with absl's 54-character prefix. Every scalar (auxiliary terms, grad_norm, img/s, TFLOP/s,
  MFU) is in metrics.jsonl and TensorBoard."""
  terms = " ".join(f"{k} {short_number(v)}" for k, v in headline_terms(scalars).items())
  eta = format_eta((total - step) / max(steps_per_s, 1e-9))
  return (f"step {step}/{total} | loss {scalars['loss']:.4g}{f' ({terms})' if terms else ''} | "
          f"lr {scalars['lr']:.2g} | {steps_per_s:.3g} steps/s ETA {eta}")


class Loop:
  """What the training loop carries from step to step, and its steps besides the train step:
  checking losses (`queue_loss`, `check_pending_loss`), logging a window of steps (`logs`,
  `log`), saving (`save`), evaluating and keeping the best parameters (`evaluate`).

  The speed (steps/s, ETA, TFLOP/s) is that of the train steps alone: the time of saves and
  evaluations (`paused`) is left out of the clock, so the window after an evaluation reads
  the same speed as the one before it."""

  def __init__(self, config: ml_collections.ConfigDict, start: int, *, model: nn.Module,
               mesh: jax.sharding.Mesh, ckpt: checkpoint.Checkpointer, writer: MetricsWriter,
               utilisation: Utilisation, evaluate_fn: Callable | None = None,
               best: checkpoint.BestKeeper | None = None, eval_dir: str | None = None):
    self.config, self.model, self.mesh, self.ckpt = config, model, mesh, ckpt
    self.eval_dir = eval_dir
    self.writer, self.utilisation = writer, utilisation
    self.evaluate_fn, self.best = evaluate_fn, best
    self.pending = None  # (step, metrics) of the step whose loss is not checked yet
    self.first = start + 1  # this run's first step: shown at once, not after log_every steps
    self.start_window(start)

  def start_window(self, step: int) -> None:
    """The steps after `step` form the next log window: their losses and time."""
    self.window_start, self.window_losses = step, []
    self.start_clock(step)

  def start_clock(self, step: int) -> None:
    """The speed is measured over the steps after `step`, from now, less `paused`."""
    self.clock_start, self.t0, self.paused = step, time.perf_counter(), 0.0

  def pause(self, state: TrainState, work: Callable[[], Any]) -> Any:
    """`work()` (a save, an evaluation), its time left out of the speed. The state is waited
    for first: the step that computes it is train time."""
    jax.block_until_ready(state)
    t = time.perf_counter()
    try:
      return work()
    finally:
      self.paused += time.perf_counter() - t

  def steps_per_s(self, step: int) -> float:
    """Train steps per second since the clock started, saves and evaluations left out."""
    dt = time.perf_counter() - self.t0 - self.paused
    return (step - self.clock_start) / max(dt, 1e-9)

  def check_loss(self, step: int, metrics: dict) -> float:
    """The step's loss; `NonFiniteLossError` when the step kept the previous state."""
    code = int(metrics["nonfinite"])
    if code:
      raise NonFiniteLossError(nonfinite_message(
          self.config, step, code, float(metrics["loss"]), float(metrics["grad_norm"]),
          self.ckpt.latest_step(), self.ckpt.directory))
    return float(metrics["loss"])

  def queue_loss(self, step: int, metrics: dict) -> None:
    """Checks the previous step's loss while this one runs (keeps dispatch asynchronous)."""
    if self.pending is not None:
      self.window_losses.append(self.check_loss(*self.pending))
    self.pending = (step, metrics)

  def check_pending_loss(self) -> None:
    """Checks the last step's loss now: before anything is logged or saved from it."""
    if self.pending is not None:
      self.window_losses.append(self.check_loss(*self.pending))
      self.pending = None

  def records(self, step: int) -> bool:
    """Whether `step`'s scalars go to metrics.jsonl and TensorBoard: every log_every steps
    and the last."""
    return is_due(step, self.config.log_every, self.config.total_steps)

  def logs(self, step: int) -> bool:
    """Whether `step` prints a progress line: the recorded steps and this run's first one,
    so that a run shows its progress within a step of starting, not log_every steps later."""
    return self.records(step) or step == self.first

  def log(self, step: int, metrics: dict) -> dict[str, float]:
    """Prints the progress line (`progress_line`) and, on a recorded step, writes the window's
    scalars (the last step's metrics, the window's mean loss and speed) to metrics.jsonl and
    TensorBoard; returns the scalars. The first step's line, when it is not recorded, records
    nothing: the window's losses run on to the next recorded step, its speed restarts."""
    config, total = self.config, self.config.total_steps
    steps_per_s = self.steps_per_s(step)
    host = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "nonfinite"}
    scalars = {**host, "loss_avg": float(np.mean(self.window_losses)),
               "steps_per_s": steps_per_s, "images_per_s": steps_per_s * config.batch_size,
               **self.utilisation.scalars(steps_per_s)}
    if jax.process_index() == 0:
      logging.info("%s", progress_line(step, total, scalars, steps_per_s))
    if not self.records(step):
      self.start_clock(step)  # its first step's time (the first batch) stays out of the next
      return scalars
    self.writer.write(step, scalars)
    if config.dataset.skip_bad_examples:
      skipped = pipeline.skipped_examples()
      if skipped:
        logging.info("skipped bad examples so far (this process, in-process reads): %d "
                     "file(s), %d read(s)", len(skipped), sum(skipped.values()))
    self.start_window(step)
    return scalars

  def save(self, step: int, state: TrainState, data_iter: Any) -> None:
    """Saves checkpoint `step` (state and data-iterator position), out of the speed."""
    self.pause(state, lambda: self.ckpt.save(step, state, data_iter))

  def evaluates(self, step: int) -> bool:
    every = self.config.eval_every
    return self.evaluate_fn is not None and bool(every) and is_due(
        step, every, self.config.total_steps)

  def evaluate(self, step: int, state: TrainState) -> None:
    """Evaluates `state`'s parameters (out of the speed), logs the headline results, writes
    them, the per-class numbers and (with `eval_dir`) the first `config.eval.num_pictures`
    pictures and the confusion matrix to TensorBoard (the files stay in EVAL_DIR/step_N/), and
    keeps the parameters in WORKDIR/best/ when they are the best so far."""
    out_dir = os.path.join(self.eval_dir, f"step_{step}") if self.eval_dir else None
    num_pictures = int(self.config.eval.num_pictures) if out_dir else 0
    results = self.pause(state, lambda: self.evaluate_fn(
        self.model, {"params": state.params, **state.model_state}, self.config,
        out_dir=out_dir, num_pictures=num_pictures))
    shown = {k: float(results[k]) for k in EVAL_HEADLINES if k in results}
    logging.info("step %d eval: %s", step, " ".join(f"{k} {v:.2f}" for k, v in shown.items()))
    self.writer.write(step, {f"eval/{k}": v for k, v in shown.items()})
    per_class = per_class_scalars(results)
    if per_class:
      self.writer.write(step, per_class)
    if out_dir and jax.process_index() == 0:
      self.writer.images(step, eval_pictures(out_dir, num_pictures))
    if self.best is not None:
      self.best.update(step, results, lambda: sharding.gather_params(
          (state.params, state.model_state), self.mesh))


PER_CLASS_METRICS = ("IoU", "Acc", "PQ", "AP")


def per_class_scalars(results: dict) -> dict[str, float]:
  """The evaluation's per-class numbers as TensorBoard scalars, "eval_class/IoU/<class name>"
  (semantic IoU / Acc, panoptic PQ, instance AP); NaN (a class absent from the split) left out."""
  rows = results.get("per_class") or []
  return {f"eval_class/{m}/{row['name']}": float(row[m]) for row in rows
          for m in PER_CLASS_METRICS
          if isinstance(row.get(m), (int, float)) and np.isfinite(row[m])}


def eval_pictures(out_dir: str, num_pictures: int) -> dict[str, np.ndarray]:
  """The pictures an evaluation wrote to `out_dir` (its first `num_pictures` panels in
  OUT_DIR/pictures/, semantic: confusion.png) as TensorBoard image tags."""
  paths = sorted(glob.glob(os.path.join(out_dir, "pictures", "*.jpg")))[:num_pictures]
  named = {f"eval_pictures/{os.path.splitext(os.path.basename(p))[0]}": p for p in paths}
  if os.path.exists(os.path.join(out_dir, "confusion.png")):
    named["eval/confusion"] = os.path.join(out_dir, "confusion.png")
  return {tag: np.asarray(Image.open(p).convert("RGB")) for tag, p in named.items()}


def write_run_files(workdir: str, config: ml_collections.ConfigDict, class_names: Any,
                    categories: list | None = None) -> None:
  """WORKDIR/config.json, classes.txt and (panoptic data) categories.json, which
  `checkpoint.load_model` reads back (process 0). Written once the state is restored or
  initialised: config.json describes the workdir's checkpoints, so a resume that fails leaves
  it as it was. Each file is replaced whole (a temporary file, then a rename)."""
  if jax.process_index() != 0:
    return
  files = {checkpoint.RUN_CONFIG: config.to_json_best_effort(indent=2),
           "classes.txt": "\n".join(class_names) + "\n"}
  for name, text in files.items():
    path = os.path.join(workdir, name)
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
  if categories is not None:
    checkpoint.write_json(os.path.join(workdir, bundle.CATEGORIES_FILE), categories)


def check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
  """The micro-batches per step (`config.grad_accum_steps`), once the global batch is known to
  split into them and over the mesh's batch shards."""
  n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  accum = int(config.grad_accum_steps)
  if accum < 1:
    raise ValueError(f"config.grad_accum_steps={accum} must be at least 1")
  if config.batch_size % (accum * n_batch_shards):
    raise ValueError(
        f"config.batch_size={config.batch_size} is not divisible by "
        + (f"config.grad_accum_steps={accum} x " if accum > 1 else "")
        + f"the {n_batch_shards} batch shards of mesh {dict(mesh.shape)}")
  return accum


def restore_or_init(config: ml_collections.ConfigDict, ckpt: checkpoint.Checkpointer,
                    start: int | None, abstract_state: TrainState, state_sh: TrainState,
                    init_fn: Callable, data_iter: Any, mesh: jax.sharding.Mesh
                    ) -> tuple[TrainState, int]:
  """(state, step): the newest intact checkpoint restored (`Checkpointer.restore_newest`: a
  damaged one is skipped with a warning naming it and why; none intact is an error), with the
  data iterator's position when it was saved by as many processes as this run has; or, without
  any checkpoint (`start` None), the initial state (with `config.model_init` merged in) at
  step 0."""
  if start is None:
    state = init_fn(jax.random.key(config.seed))
    if config.model_init:
      state = _load_init(config, state, state_sh)
    return state, 0

  def restore(step: int) -> TrainState:
    try:
      saved = checkpoint.saved_process_count(ckpt.directory, step)
    except ValueError as e:  # iterator states of several process counts
      raise checkpoint.DamagedCheckpointError(step, ckpt.step_dir(step), str(e)) from None
    restore_iter = data_iter
    if saved != jax.process_count():
      restore_iter = None
      logging.warning(
          "checkpoint %d holds the data iterator state of %s process(es), this run has %d: "
          "restoring the train state only (resharded onto mesh %s); the data order restarts "
          "from a fresh per-process shuffle.", step, saved or "no", jax.process_count(),
          dict(mesh.shape))
    return ckpt.restore(abstract_state, restore_iter, step=step)

  state, step = ckpt.restore_newest(restore)
  logging.info("resumed from %s at step %d", ckpt.directory, step)
  return state, step


def trained_to(ckpt_dir: str) -> int | None:
  """The newest step in `ckpt_dir` whose checkpoint looks intact from its small files
  (`checkpoint.step_damage`; no array is read), or None: how far a rerun would resume. A
  damaged newer step is passed over, as the resume would (which then trains it again)."""
  for step in reversed(checkpoint.saved_steps(ckpt_dir)):
    if checkpoint.step_damage(os.path.join(ckpt_dir, str(step))) is None:
      return step
  return None


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """What `train` compiles, built from shapes only (`train_program`): the model, its state's
  shardings and abstract state (ShapeDtypeStructs carrying them), its variables' shapes
  (`flops.train_step_flops` counts from them), and the jitted `init(rng)`
  and `step(state, batch) -> (state, metrics)` (state donated). `step.lower(abstract_state,
  abstract_batch(config, mesh)).compile()` compiles the step without any parameter existing
  (train.py, benchmarks/compile_time.py)."""
  model: nn.Module
  state_sh: TrainState
  abstract_state: TrainState
  variables: Any  # the model's variables as ShapeDtypeStructs (no shardings)
  init: Any
  step: Any


def train_program(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> TrainProgram:
  """The train step of `config` on `mesh`: model and optimizer shapes via `jax.eval_shape`,
  logical shardings, the jitted init with `out_shardings`, the jitted step (loss and gradients
  summed over `config.grad_accum_steps` micro-batches, one optimizer update, `keep_finite`)."""
  rules = sharding.LOGICAL_RULES
  model = build_model(config.model)
  dummy = jnp.zeros(input_shape(config), jnp.float32)
  boxed_vars = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy))
  boxed_params = boxed_vars["params"]
  abstract_vars = nn.meta.unbox(boxed_vars)
  abstract_params = abstract_vars["params"]
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps, abstract_params)
  param_sh = sharding.logical_shardings(boxed_params, mesh, rules)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  repl = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                 transform_non_params=lambda _: repl)
  # Other collections (BatchNorm statistics): small, replicated.
  model_state_sh = jax.tree.map(lambda _: repl, model_state_of(abstract_vars))
  state_sh = TrainState(step=repl, params=param_sh, opt_state=opt_sh,
                        model_state=model_state_sh)

  def init(rng):
    variables = nn.meta.unbox(model.init(rng, dummy))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model_state=model_state_of(variables))

  value_and_grad = accumulated_value_and_grad(loss_fn(model, config), config, mesh, param_sh)
  base_rng = jax.random.key(config.seed)

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(base_rng, state.step)
    (loss, (terms, model_state)), grads = value_and_grad(state.params, state.model_state,
                                                         batch, rng, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = {"loss": loss, **terms, "grad_norm": grad_norm, "lr": schedule(state.step)}
    for name, value in training_inputs(config.model, state.step).items():  # mask_probs_0 ...
      metrics.update({f"{name}_{i}": v for i, v in enumerate(value)})
    # A non-finite loss, gradient or updated state keeps the state before the step.
    new_state, metrics["nonfinite"] = keep_finite(
        state, TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                          model_state=model_state), loss, grad_norm)
    return new_state, metrics

  # `init`'s output shapes, from the shapes above (the model is not traced again).
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                 opt_state=abstract_opt, model_state=model_state_of(abstract_vars)),
      state_sh)
  return TrainProgram(
      model=model, state_sh=state_sh, abstract_state=abstract_state, variables=abstract_vars,
      init=jax.jit(init, out_shardings=state_sh),
      step=jax.jit(train_step, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sh, repl), donate_argnums=(0,)))


def train(config: ml_collections.ConfigDict, workdir: str,
          evaluate_fn: Callable | None = None) -> dict[str, float]:
  """Trains until `config.total_steps`; returns the last logged scalars. `evaluate_fn(model,
  variables, config) -> results` runs every `config.eval_every` steps (and after the last).
  A finished run, rerun (its newest checkpoint at total_steps or beyond, `trained_to`), logs
  "already trained to step N" and returns {} before the dataset is read or anything compiles."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  # Before anything is read or written: the settings, and (a fresh run) the model_init file.
  config_check.check(config, evaluates=evaluate_fn is not None,
                     resumes=checkpoint.has_checkpoints(ckpt_dir))
  # A resumed run's config against its checkpoints' (WORKDIR/config.json), before anything is
  # read, compiled or written: config.json is rewritten only once the state is restored.
  checkpoint.check_resume_config(workdir, config)
  done = trained_to(ckpt_dir)
  if done is not None and done >= config.total_steps:  # a finished run, rerun
    logging.info("already trained to step %d (total_steps %d): nothing to do", done,
                 config.total_steps)
    return {}
  os.makedirs(workdir, exist_ok=True)

  # Data first: a missing dataset fails here, within seconds.
  train_source = registry.get_source(config.dataset, config.dataset.train_split)
  class_names = train_source.class_names
  # Panoptic data: the COCO category ids and thing flags, which panoptic output needs.
  categories = getattr(train_source, "categories", None)
  bundle_extra = {"categories": categories.as_json()} if hasattr(categories, "as_json") else {}

  # Mesh.
  mesh = sharding.make_mesh(config.mesh)
  accum = check_batch(config, mesh)
  rules = sharding.LOGICAL_RULES

  # Model and optimizer shapes, shardings, the jitted init and train step.
  program = train_program(config, mesh)
  model, state_sh, abstract_state = program.model, program.state_sh, program.abstract_state
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
  logging.info("model: %s parameters; mesh %s over %d process(es); batch %d%s", f"{n_params:,}",
               dict(mesh.shape), jax.process_count(), config.batch_size,
               f" in {accum} micro-batches of {config.batch_size // accum}" if accum > 1 else "")

  # Its FLOPs, counted from shapes (nothing compiles), and the devices' peak: the MFU.
  utilisation = Utilisation(
      flops.train_step_flops(config, program.variables),
      flops.peak_tflops(mesh.devices.flat[0].device_kind, jnp.dtype(model.dtype).name),
      mesh.size)
  logging.info("%s", utilisation.describe())

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    init_jit, step_jit = program.init, program.step
    data_iter = pipeline.make_train_iterator(config)
    ckpt = checkpoint.Checkpointer(ckpt_dir, keep=config.keep_ckpts)
    start = ckpt.latest_step()

    # SIGTERM / SIGINT from here on (compiling and restoring included) stop the run after its
    # first step, saved; the handlers are the defaults again once the loop is left.
    with StopRequest() as stop:
      # Compile the step once, from shapes: its memory needs are known before the first batch,
      # and the loop runs this compiled object.
      t_compile = time.perf_counter()
      step_fn = step_jit.lower(abstract_state, abstract_batch(config, mesh)).compile()
      logging.info("train step compiled in %.1f s", time.perf_counter() - t_compile)
      logging.info("%s", memory_log_line(step_fn, abstract_state, state_sh))

      # Resume, or start.
      state, start = restore_or_init(config, ckpt, start, abstract_state, state_sh, init_jit,
                                     data_iter, mesh)
      write_run_files(workdir, config, class_names, bundle_extra.get("categories"))

      # The loop: a train step, then whichever of logging, saving and evaluating falls on it.
      writer = MetricsWriter(workdir, start)
      best = None
      if evaluate_fn is not None and config.eval_every and config.eval.best_metric:
        best = checkpoint.BestKeeper(workdir, config.eval.best_metric, model_cfg=config.model,
                                     mean=config.mean, std=config.std, class_names=class_names,
                                     source=os.path.abspath(workdir),
                                     eval=config.eval.to_dict(), **bundle_extra)
      loop = Loop(config, start, model=model, mesh=mesh, ckpt=ckpt, writer=writer,
                  utilisation=utilisation, evaluate_fn=evaluate_fn, best=best,
                  eval_dir=os.path.join(workdir, "eval"))
      total, last, stopped = config.total_steps, {}, None
      runtime.wait_for_all_processes("first_step")
      try:
        for step in range(start + 1, total + 1):
          batch = sharding.global_batch(next(data_iter), mesh)
          state, metrics = step_fn(state, batch)
          loop.queue_loss(step, metrics)
          logs, saves = loop.logs(step), is_due(step, config.ckpt_every, total)
          stops = stop.due(step)  # SIGTERM / SIGINT: save this step and stop
          if logs or saves or stops:
            loop.check_pending_loss()
          if logs:
            last = loop.log(step, metrics)
          if saves or stops:
            loop.save(step, state, data_iter)
          if stops:  # before any evaluation: a preemption leaves little time
            stopped = step
            break
          if loop.evaluates(step):
            loop.evaluate(step, state)
      finally:
        ckpt.close()
        writer.close()
        data_iter.close()  # grain's worker processes and their shared memory, now
        runtime.wait_for_shared_memory_release()
    if stopped is not None:
      raise stop.stopped(stopped, ckpt.directory)
  return last


def _load_init(config, state: TrainState, state_sh: TrainState) -> TrainState:
  """`state` with `config.model_init` (format `config.model_init_format`) merged strictly into
  its parameters: a whole-model bundle, or pretrained backbone weights (see
  `segvit_jax.convert.init_params`). A whole-model bundle of this model also brings its other
  collections (BatchNorm statistics)."""
  merged = convert.init_params(state.params, config.model, config.model_init,
                               config.model_init_format, mean=config.mean, std=config.std)
  model_state = state.model_state
  if config.model_init_format == "bundle" and model_state:
    shapes = lambda tree: jax.tree.map(np.shape, tree)  # noqa: E731
    loaded = bundle.load_model_state(config.model_init)
    whole = shapes(vit.unstack_blocks(bundle.load_params(config.model_init))) == shapes(
        vit.unstack_blocks(state.params))
    if whole and set(loaded) == set(model_state):  # the same model: its statistics too
      model_state = {k: bundle.merge_params(model_state[k], loaded[k],
                                            source=f"{config.model_init} ({k})")
                     for k in model_state}
  logging.info("initialised from %s (%s)", config.model_init, config.model_init_format)
  return state.replace(params=jax.device_put(merged, state_sh.params),
                       model_state=jax.device_put(model_state, state_sh.model_state))
