"""The training loop behind `train.py` (big_vision style, one readable function):
mesh -> data -> model and optimizer shapes via `jax.eval_shape` -> shardings -> jitted init
with `out_shardings` -> jitted step with donated state -> resume -> loop.

Resuming: rerunning with the same workdir restores the latest checkpoint (train state, step
and the data iterator position) and continues bit-identically. A non-finite loss stops the
run before anything is saved from it, so the last good checkpoint stays intact.
"""

from __future__ import annotations

import json
import math
import os
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

from segvit_jax import checkpoint as ckpt_lib
from segvit_jax import convert, optim, sharding
from segvit_jax.data import pipeline, sources
from segvit_jax.losses import atm_loss
from segvit_jax.models import build_model


class NonFiniteLossError(FloatingPointError):
  pass


def quiet_library_logs(libraries: tuple[str, ...] = ("orbax", "grain")) -> None:
  """Keeps warnings but drops the INFO chatter of `libraries` (orbax logs every save)."""
  import logging as py_logging  # pylint: disable=g-import-not-at-top

  class _Filter(py_logging.Filter):
    def filter(self, record):
      return record.levelno >= py_logging.WARNING or not any(
          f"/{lib}/" in record.pathname for lib in libraries)

  logging.get_absl_handler().addFilter(_Filter())


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  h, w = config.augment.crop_size
  return (1, h, w, 3)


def loss_fn(model: nn.Module, config: ml_collections.ConfigDict) -> Callable:
  """(params, batch, rng) -> (loss, terms) for the model family of `config.model`."""
  loss_cfg = dict(config.loss)

  def fn(params, batch, rng):
    out = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
    return atm_loss(out, batch["label"], num_classes=config.model.num_classes,
                    ignore_index=config.dataset.ignore_index, **loss_cfg)

  return fn


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsWriter:
  """Console + TensorBoard + `metrics.jsonl` (one JSON object per logged step), process 0."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.tb = None
    if self.active:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()

  def close(self) -> None:
    if self.active:
      self.tb.close()
      self.jsonl.close()


def train(config: ml_collections.ConfigDict, workdir: str,
          evaluate_fn: Callable | None = None) -> dict[str, float]:
  """Trains until `config.total_steps`; returns the last logged scalars."""
  os.makedirs(workdir, exist_ok=True)

  # Data first: a missing dataset fails here, within seconds.
  class_names = sources.get_source(config.dataset, config.dataset.train_split).class_names
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "classes.txt"), "w") as f:
      f.write("\n".join(class_names) + "\n")

  # Mesh.
  mesh = sharding.make_mesh(config.mesh)
  n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % n_batch_shards:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{n_batch_shards} batch shards of mesh {dict(mesh.shape)}")
  rules = sharding.LOGICAL_RULES

  # Model and optimizer shapes, then shardings.
  model = build_model(config.model)
  dummy = jnp.zeros(input_shape(config), jnp.float32)
  boxed_params = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy)["params"])
  abstract_params = nn.meta.unbox(boxed_params)
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps, abstract_params)
  param_sh = sharding.logical_shardings(boxed_params, mesh, rules)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  repl = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                 transform_non_params=lambda _: repl)
  state_sh = TrainState(step=repl, params=param_sh, opt_state=opt_sh)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
  logging.info("model: %s parameters; mesh %s", f"{n_params:,}", dict(mesh.shape))

  def init(rng):
    params = nn.meta.unbox(model.init(rng, dummy)["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  compute_loss = loss_fn(model, config)
  base_rng = jax.random.key(config.seed)

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(base_rng, state.step)
    (loss, terms), grads = jax.value_and_grad(compute_loss, has_aux=True)(
        state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  batch_sh = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    init_jit = jax.jit(init, out_shardings=state_sh)
    step_jit = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                       out_shardings=(state_sh, repl), donate_argnums=(0,))

    # Resume, or start.
    data_iter = pipeline.make_train_iterator(config)
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_ckpts)
    start = ckpt.latest_step()
    if start is None and config.model_init:
      convert.require_init(config.model_init)  # before compiling anything
    if start is not None:
      abstract_state = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
          jax.eval_shape(init, jax.random.key(0)), state_sh)
      state = ckpt.restore(abstract_state, data_iter, step=start)
      logging.info("resumed from %s at step %d", ckpt.directory, start)
    else:
      state = init_jit(jax.random.key(config.seed))
      start = 0
      if config.model_init:
        state = state.replace(params=_load_init(config, state.params, param_sh))

    writer = MetricsWriter(workdir)
    total = config.total_steps
    last, window_losses, t0, pending = {}, [], time.perf_counter(), None
    window_start = start

    def check(step: int, metrics: dict) -> float:
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"non-finite loss ({loss}) at step {step}: stopping. The last good checkpoint "
            f"({ckpt.latest_step()}) in {ckpt.directory} is intact. Lower optim.lr, check "
            f"the data, or set model.dtype='float32'.")
      return loss

    try:
      for step in range(start + 1, total + 1):
        batch = sharding.global_batch(next(data_iter), mesh)
        state, metrics = step_jit(state, batch)
        # Check the previous step's loss while this one runs (keeps dispatch asynchronous).
        if pending is not None:
          window_losses.append(check(*pending))
        pending = (step, metrics)

        if step % config.log_every == 0 or step == total or step % config.ckpt_every == 0:
          window_losses.append(check(*pending))
          pending = None
        if step % config.log_every == 0 or step == total:
          dt = time.perf_counter() - t0
          steps_per_s = (step - window_start) / dt
          host = {k: float(v) for k, v in jax.device_get(metrics).items()}
          last = {**host, "loss_avg": float(np.mean(window_losses)),
                  "steps_per_s": steps_per_s,
                  "images_per_s": steps_per_s * config.batch_size}
          writer.write(step, last)
          if jax.process_index() == 0:
            terms = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in host.items()
                             if k.startswith("loss_"))
            logging.info(
                "step %d/%d | loss %.4f (%s) | lr %.3g | grad_norm %.3g | %.2f steps/s "
                "%.1f img/s | ETA %s", step, total, last["loss"], terms, last["lr"],
                last["grad_norm"], steps_per_s, last["images_per_s"],
                format_eta((total - step) / max(steps_per_s, 1e-9)))
          if config.dataset.get("skip_bad_examples", False):
            skipped = pipeline.skipped_examples()
            if skipped:
              logging.info("skipped bad examples so far (this process, in-process reads): %d "
                           "file(s), %d read(s)", len(skipped), sum(skipped.values()))
          window_losses, t0, window_start = [], time.perf_counter(), step
        if step % config.ckpt_every == 0 or step == total:
          ckpt.save(step, state, data_iter)
        if evaluate_fn is not None and config.eval_every and (
            step % config.eval_every == 0 or step == total):
          results = evaluate_fn(model, state.params, config)
          logging.info("step %d eval: mIoU %.2f mAcc %.2f aAcc %.2f", step, results["mIoU"],
                       results["mAcc"], results["aAcc"])
          writer.write(step, {f"eval/{k}": results[k] for k in ("mIoU", "mAcc", "aAcc")})
    finally:
      ckpt.close()
      writer.close()
  return last


def _load_init(config, params, param_sh):
  """Merges `config.model_init` (format `config.model_init_format`) strictly into `params`:
  a whole-model bundle, or pretrained backbone weights (see `segvit_jax.convert.init_params`)."""
  merged = convert.init_params(params, config.model, config.model_init,
                               config.model_init_format, mean=config.mean, std=config.std)
  logging.info("initialised from %s (%s)", config.model_init, config.model_init_format)
  return jax.device_put(merged, param_sh)
