"""Checks a training config before anything is written, built or compiled (`check`, the first
thing `trainer.train` does), so that a wrong setting fails in a second, naming the key, its
value and what is allowed, instead of training silently or failing after the compilation.

What each key allows follows from how the trainer, the optimizer and the pipeline use it:

  total_steps                   >= 1: the loop runs steps 1..total_steps (0 would do nothing)
  batch_size, grad_accum_steps  >= 1 (their divisibility by the mesh is checked with the mesh)
  log_every, ckpt_every         >= 1: something due every N steps is also due after the last
                                step (`trainer.is_due`), so N = total_steps logs / saves only at
                                the end; 0 has no meaning there (it divided by zero)
  eval_every                    >= 0: 0 never evaluates during training
  keep_ckpts                    >= 1 checkpoints kept
  optim.lr                      >= 0 (finite): the peak learning rate (0: the parameters stay,
                                for checks); a negative one ascends
  optim.min_lr                  0 <= min_lr <= lr (poly decays from lr to it)
  optim.weight_decay, optim.poly_power, optim.clip_norm (0: no clipping)   >= 0 (finite)
  optim.b1, optim.b2            in [0, 1) (Adam's moment decays); optim.eps > 0
  optim.warmup_steps, optim.backbone_warmup_steps   >= 0; optim.warmup_ratio in [0, 1]
  optim.layer_decay             None (off) or in (0, 1]
  optim.layer_decay_skip_last   an integer >= 0 (at most the backbone's blocks: the optimizer)
  optim.lr_mults                every multiplier >= 0 (0 freezes that module)
  optim.schedule                "warmup_poly" or "two_stage"
  model.attention               one of models.layers.ATTENTION_IMPLEMENTATIONS ("auto", "xla",
                                "cudnn", "explicit")
  model.num_classes             >= 1, and the dataset's class count (config.dataset.num_classes,
                                which the dataset's source checks against its class list, or
                                the registry's class list when that is None)
  dataset.num_workers, dataset.prefetch   >= 0
  dataset.num_train, dataset.num_eval     >= 1 (the synthetic dataset's split sizes)
  eval.max_examples             -1 (the whole split) or >= 1
  model_init                    '' / None, or an existing file or folder (a fresh run starts
                                from it; a resumed run does not read it)
  the evaluation split          not empty, when training evaluates (eval_every > 0): found at
                                the start rather than at the first evaluation
"""

from __future__ import annotations

import math
from typing import Any, Callable

import ml_collections

from segvit_jax import convert
from segvit_jax.data import registry
from segvit_jax.models import layers

_MISSING = object()
SCHEDULES = ("warmup_poly", "two_stage")


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def int_at_least(low: int) -> Callable[[Any], bool]:
  return lambda v: _is_int(v) and v >= low


def number_in(low: float, high: float = math.inf, *, low_open: bool = False,
              high_open: bool = False) -> Callable[[Any], bool]:
  """A finite number in [low, high] (either end open on request)."""
  def test(v):
    if not _is_number(v):
      return False
    above = v > low if low_open else v >= low
    below = v < high if high_open else v <= high
    return above and below
  return test


# (key, test, what is allowed): one rule per key, in the order of configs/common.py.
RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("total_steps", int_at_least(1), "an integer >= 1 (the steps to train)"),
    ("batch_size", int_at_least(1), "an integer >= 1 (the global batch)"),
    ("grad_accum_steps", int_at_least(1), "at least 1 (micro-batches per step)"),
    ("log_every", int_at_least(1),
     "an integer >= 1 (the last step is always logged: total_steps logs only at the end)"),
    ("ckpt_every", int_at_least(1),
     "an integer >= 1 (a checkpoint is always written after the last step: total_steps "
     "saves only at the end)"),
    ("eval_every", int_at_least(0), "0 (no evaluation during training) or an integer >= 1"),
    ("keep_ckpts", int_at_least(1), "an integer >= 1 (checkpoints kept)"),
    ("optim.lr", number_in(0),
     "a finite number >= 0 (the peak learning rate; 0 leaves the parameters as they are, a "
     "negative one makes the loss grow)"),
    ("optim.weight_decay", number_in(0), "a finite number >= 0"),
    ("optim.b1", number_in(0, 1, high_open=True), "in [0, 1) (Adam's first-moment decay)"),
    ("optim.b2", number_in(0, 1, high_open=True), "in [0, 1) (Adam's second-moment decay)"),
    ("optim.eps", number_in(0, low_open=True), "a finite number > 0"),
    ("optim.clip_norm", number_in(0), "a finite number >= 0 (0: no gradient clipping)"),
    ("optim.schedule", lambda v: v in SCHEDULES, f"one of {', '.join(map(repr, SCHEDULES))}"),
    ("optim.warmup_steps", int_at_least(0), "an integer >= 0"),
    ("optim.warmup_ratio", number_in(0, 1), "in [0, 1] (the warm-up's first lr / lr)"),
    ("optim.backbone_warmup_steps", int_at_least(0), "an integer >= 0"),
    ("optim.poly_power", number_in(0), "a finite number >= 0"),
    ("optim.layer_decay", lambda v: v is None or number_in(0, 1, low_open=True)(v),
     "None (off) or in (0, 1]"),
    ("optim.layer_decay_skip_last", int_at_least(0),
     "an integer >= 0 (the last blocks without layer-wise decay)"),
    ("model.num_classes", int_at_least(1), "an integer >= 1"),
    ("model.attention", lambda v: v in layers.ATTENTION_IMPLEMENTATIONS,
     f"one of {', '.join(map(repr, layers.ATTENTION_IMPLEMENTATIONS))} (how attention is "
     "computed)"),
    ("dataset.num_workers", int_at_least(0), "an integer >= 0 (0: read in this process)"),
    ("dataset.prefetch", int_at_least(0), "an integer >= 0"),
    ("eval.max_examples", lambda v: v == -1 or int_at_least(1)(v),
     "-1 (the whole split) or an integer >= 1"),
)


def get(config: ml_collections.ConfigDict, key: str) -> Any:
  """`config`'s value at the dotted `key`, or _MISSING."""
  node = config
  for part in key.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return _MISSING
    node = node[part]
  return node


def problem(key: str, value: Any, allowed: str) -> str:
  return f"config.{key}={value!r} must be {allowed}"


def settings_problems(config: ml_collections.ConfigDict) -> list[str]:
  """One message per setting of `config` that `RULES` (and the cross-key rules: min_lr <= lr,
  the lr multipliers) do not allow; keys a config does not have are skipped."""
  out = []
  for key, test, allowed in RULES:
    value = get(config, key)
    if value is not _MISSING and not test(value):
      out.append(problem(key, value, allowed))
  lr, min_lr = get(config, "optim.lr"), get(config, "optim.min_lr")
  lr_ok = number_in(0, low_open=True)(lr)  # a bad lr has its own message
  if min_lr is not _MISSING and not (
      _is_number(min_lr) and min_lr >= 0 and (not lr_ok or min_lr <= lr)):
    out.append(problem("optim.min_lr", min_lr, f"in [0, optim.lr={lr!r}]"))
  if get(config, "dataset.name") == "synthetic":  # the built-in set's split sizes
    for key in ("dataset.num_train", "dataset.num_eval"):
      value = get(config, key)
      if value is not _MISSING and not int_at_least(1)(value):
        out.append(problem(key, value, "an integer >= 1 (examples of the synthetic split)"))
  mults = get(config, "optim.lr_mults")
  if mults is not _MISSING and mults is not None:
    for name, mult in dict(mults).items():
      if not number_in(0)(mult):
        out.append(problem(f"optim.lr_mults.{name}", mult,
                           "a finite number >= 0 (0 freezes the module)"))
  return out


def dataset_class_count(dataset_cfg: ml_collections.ConfigDict) -> int:
  """The classes the dataset of `config.dataset` has: `num_classes` when set (building the
  source checks it against the dataset's list), else the registry's class list."""
  if dataset_cfg.get("num_classes") is not None:
    return int(dataset_cfg.num_classes)
  return len(registry.class_names(dataset_cfg))


def data_problems(config: ml_collections.ConfigDict, evaluates: bool) -> list[str]:
  """The model's class count against the dataset's; with `evaluates` and eval_every > 0, the
  evaluation split's length (building its source raises what a missing split raises)."""
  out = []
  k, dataset_cfg = get(config, "model.num_classes"), config.dataset
  if _is_int(k) and k >= 1:
    want = dataset_class_count(dataset_cfg)
    if k != want:
      out.append(f"config.model.num_classes={k} must be the {want} classes of dataset "
                 f"{dataset_cfg.name!r} (config.dataset.num_classes="
                 f"{dataset_cfg.get('num_classes')!r}): the model would predict classes the "
                 "labels do not have, or miss some")
  every = get(config, "eval_every")
  if evaluates and _is_int(every) and every > 0:
    split = dataset_cfg.eval_split
    n = len(registry.get_source(dataset_cfg, split))
    if n == 0:
      out.append(f"config.dataset.eval_split={split!r} of dataset {dataset_cfg.name!r} has no "
                 f"examples, and config.eval_every={every} evaluates it during training: point "
                 "it at a split with examples, or set config.eval_every=0")
  return out


class ConfigError(ValueError):
  """A training config with settings the trainer cannot run; the message lists them."""


def init_problems(config: ml_collections.ConfigDict, resumes: bool) -> list[str]:
  """`config.model_init` (the weights a fresh run starts from) must exist: checked before the
  dataset is read or the workdir written, so that a wrong path fails in a second. A resumed run
  (`resumes`) starts from its checkpoint and does not read it."""
  path = get(config, "model_init")
  if resumes or path is _MISSING or not path:
    return []
  try:
    convert.require_init(path)
  except FileNotFoundError as e:
    return [f"config.model_init={path!r}: {e}"]
  return []


def check(config: ml_collections.ConfigDict, evaluates: bool = True,
          resumes: bool = False) -> None:
  """Raises ConfigError listing every setting of `config` the module docstring does not allow
  (one line each); `evaluates`: whether the run evaluates during training (the trainer has an
  evaluation function), so that an empty evaluation split is an error; `resumes`: whether the
  run resumes a checkpoint (else `config.model_init`, when set, must exist). The settings and
  the model_init file are checked first: the data checks run only on a config that passes
  them."""
  problems = settings_problems(config) + init_problems(config, resumes)
  if not problems:
    problems = data_problems(config, evaluates)
  if problems:
    raise ConfigError(problems[0] if len(problems) == 1 else
                      f"{len(problems)} invalid settings:\n  " + "\n  ".join(problems))
