"""Multiply-add counts of a model's forward pass, the "GFLOPs" of the SegViT and SegFormer
papers (SegViT Tables 1-3 and Sec. 4.2, counted with fvcore: GFLOPs are multiply-adds).

  python -m segvit_jax.flops --config configs/segvit_vit_l16_ade20k.py
  python -m segvit_jax.flops --config configs/segvit_vit_b16_ade20k.py --size 512x683 \
      --config.model.head.layers_per_stage=2

The count walks the jaxpr of `model.apply` traced on abstract shapes (`jax.eval_shape`,
`jax.make_jaxpr`): nothing runs, a ViT-L at 640 is counted in about a second on a CPU.
What counts (fvcore's convention for the ops that matter in these models):
  dot_general           batch x lhs-free x rhs-free x contracting sizes (matmuls, einsums,
                        Dense layers, attention products);
  conv_general_dilated  output elements x kernel window x input features per group; a
                        transposed convolution (input dilation): input pixels x kernel size,
                        as fvcore counts it (the inserted zeros are not multiply-adds);
  depthwise convolutions written as shifted products (`cpu_ops.DepthwiseConv`, scope
                        "depthwise_conv"): those products, as a convolution's MACs;
  everything else       0 (elementwise ops, softmax, norms, reductions, gathers). fvcore adds
                        ~5 per element for a LayerNorm: ~0.1% of a ViT, left out.
Interpolation is reported apart and left out of the total. Resizes in this repository are
separable matrix products (`layers.resize_grid`, run under the name scope "resize"); neither
paper's tool counted them as such: the SegViT numbers come from fvcore's FlopCountAnalysis of
mmseg's `forward_dummy` (SegViT's tools/get_flops_fvcore.py), which charges an
upsample_bilinear2d 4 per output element, and SegFormer's from mmcv's
get_model_complexity_info, which does not see F.interpolate at all. As matmuls they would be
large: upsampling 150 class maps to 512 x 512 is 6.3 G, most of a SegFormer-B0. Without them,
SegViT ViT-B / ViT-L on ADE20K count 120.5 / 637.0 G (paper 120.9 / 637.9; the rest is
fvcore's LayerNorm and upsampling charges) and SegFormer B0-B5 within 0.14% of the paper.

Sub-jaxprs: jit / closed_call / remat / custom_jvp / custom_vjp and any other primitive holding
jaxprs count each once; scan counts its body `length` times; while counts its body (and
predicate) ONCE, as the trip count is unknown at trace time; cond counts its costliest branch.

Per-module split: Flax runs every module method under `jax.named_scope` (flax_profile, on by
default), so an equation's name stack reads like "SegViT/backbone/encoderblock_3/attn/query".
Equations inside a sub-jaxpr carry stacks relative to the equation holding it (a scanned block
reads "encoderblock/attn/query" under a scan at "SegViT/backbone"), so the walk prefixes the
parent's stack. Each count goes to the first stack component naming a direct child of the
root module (recorded with `nn.intercept_methods`, ".method" suffixes dropped). Work done by
the root module's own code -- in a SegViT the bilinear mask upsampling and the semantic-score
einsum of `SegViT.__call__` -- goes to the "head" bucket: mmseg's SegViT runs both inside its
decode head (`ATMHead.forward` upsamples, `semantic_inference` in test mode), and the papers
split the cost into backbone + decode head. Models without a child named "head" report that
work as "other". Equations under a "resize" scope go to the "resize" bucket, which `count_model`
reports beside the total, not in it.
"""

from __future__ import annotations

import collections
import functools
import math
import re
import sys
from typing import Any, Collection, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from jax.extend import core as jax_core
from ml_collections import config_flags

from segvit_jax import runtime
from segvit_jax.models import build_model, cpu_ops, input_divisor, layers

GIGA = 1e9


def eqn_macs(eqn: jax_core.JaxprEqn) -> int:
  """Multiply-adds of one equation itself (sub-jaxprs excluded): dot_general and
  conv_general_dilated; 0 for every other primitive."""
  name = eqn.primitive.name
  if name == "dot_general":
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    rhs_free = [d for i, d in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch)]
    # Every lhs element (batch x free x contracting) meets every rhs-free column once.
    return math.prod(lhs) * math.prod(rhs_free)
  if name == "conv_general_dilated":
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    dims = eqn.params["dimension_numbers"]
    if any(d > 1 for d in eqn.params.get("lhs_dilation") or ()):
      # A transposed convolution: every input pixel meets every kernel entry once (the zeros
      # the dilation inserts are not multiply-adds): batch x input pixels x kernel size.
      spatial = [lhs[i] for i in dims.lhs_spec[2:]]
      return lhs[dims.lhs_spec[0]] * math.prod(spatial) * math.prod(rhs)
    out_features = rhs[dims.rhs_spec[0]]
    # The kernel's input-feature axis already holds in_features / feature_group_count.
    return math.prod(eqn.outvars[0].aval.shape) * (math.prod(rhs) // out_features)
  return 0


def _as_jaxpr(x: Any) -> jax_core.Jaxpr | None:
  if isinstance(x, jax_core.ClosedJaxpr):
    return x.jaxpr
  return x if isinstance(x, jax_core.Jaxpr) else None


def _join(prefix: str, stack: str) -> str:
  return "/".join(s for s in (prefix, stack) if s)


def macs_by_scope(jaxpr: jax_core.Jaxpr | jax_core.ClosedJaxpr,
                  prefix: str = "") -> collections.Counter[str]:
  """Multiply-adds of a jaxpr, recursively, keyed by each equation's full name stack
  ("SegViT/backbone/encoderblock_0/attn/query"); see the module docstring for the rules."""
  jaxpr = _as_jaxpr(jaxpr)
  counts: collections.Counter[str] = collections.Counter()
  for eqn in jaxpr.eqns:
    scope = _join(prefix, str(eqn.source_info.name_stack))
    if macs := eqn_macs(eqn):
      counts[scope] += macs
    elif eqn.primitive.name == "mul" and DEPTHWISE in scope.split("/"):
      # `cpu_ops.DepthwiseConv` computes a convolution as elementwise products: count them.
      counts[scope] += math.prod(eqn.outvars[0].aval.shape)
    name, params = eqn.primitive.name, eqn.params
    if name == "cond":  # one branch runs: the costliest
      branches = [macs_by_scope(b, scope) for b in params["branches"]]
      counts.update(max(branches, key=lambda c: sum(c.values())))
      continue
    for value in params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if (sub := _as_jaxpr(sub)) is not None:
          sub_counts = macs_by_scope(sub, scope)
          if name == "scan":
            sub_counts = collections.Counter(
                {k: v * params["length"] for k, v in sub_counts.items()})
          counts.update(sub_counts)  # while: body and predicate once
  return counts


def count_macs(jaxpr: jax_core.Jaxpr | jax_core.ClosedJaxpr) -> int:
  """Total multiply-adds of a jaxpr (`jax.make_jaxpr(f)(*abstract_args)`)."""
  return sum(macs_by_scope(jaxpr).values())


RESIZE = layers.RESIZE_SCOPE
DEPTHWISE = cpu_ops.DEPTHWISE_SCOPE


def group_by_module(counts: Mapping[str, int], children: Collection[str],
                    outside: str = "other") -> dict[str, int]:
  """Sums name-stack counts per child module: the first stack component naming one of
  `children` (a ".method" suffix dropped); counts under none go to `outside`, counts inside
  a "resize" scope (interpolation) to "resize"."""
  groups: dict[str, int] = collections.defaultdict(int)
  for scope, macs in counts.items():
    names = [part.split(".")[0] for part in scope.split("/")]
    if RESIZE in names:
      groups[RESIZE] += macs
    else:
      groups[next((n for n in names if n in children), outside)] += macs
  return dict(groups)


def apply_scopes(model: nn.Module, variables: Any, *args, **kwargs
                 ) -> tuple[collections.Counter[str], set[str]]:
  """`macs_by_scope` of `model.apply(variables, *args, **kwargs)` traced with `variables` and
  `args` abstract (arrays or jax.ShapeDtypeStructs; `kwargs` stay static, e.g. `train=False`),
  and the names of the root module's direct children."""
  children = set()

  def record_children(next_fun, args, kwargs, context):
    if len(context.module.path) == 1:
      children.add(context.module.path[0])
    return next_fun(*args, **kwargs)

  with nn.override_named_call(True), nn.intercept_methods(record_children):
    jaxpr = jax.make_jaxpr(lambda v, a: model.apply(v, *a, **kwargs))(variables, args)
  return macs_by_scope(jaxpr), children


def model_scopes(config: ml_collections.ConfigDict, height: int | None = None,
                 width: int | None = None, batch: int = 1, variables: Any = None
                 ) -> tuple[collections.Counter[str], set[str]]:
  """`apply_scopes` of one eval-mode forward pass of `build_model(config.model)` on a
  (batch, height, width, 3) input (default: `config.augment.crop_size`), abstract throughout.
  `config` is a run config or its `model` part (then give the size); `variables`: the model's
  variables (or their ShapeDtypeStructs) where the caller has them, else traced from its init."""
  model_cfg = config.model if "model" in config else config
  if height is None or width is None:
    if "augment" not in config:
      raise ValueError("give height and width, or a run config with augment.crop_size")
    height, width = config.augment.crop_size
  model = build_model(model_cfg)
  images = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)
  if variables is None:
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                               images)
  return apply_scopes(model, variables, images, train=False)


def count_model(config: ml_collections.ConfigDict, height: int | None = None,
                width: int | None = None, batch: int = 1,
                outside: str | None = "head", variables: Any = None) -> dict[str, int]:
  """Multiply-adds of one eval-mode forward pass (see `model_scopes` for the arguments):
  {"total": ..., then one entry per top-level submodule with any MACs, largest first (a SegViT:
  "backbone", "head")}, and "resize": the interpolation's MACs, NOT in the total (module
  docstring). MACs of the root module's own code go to `outside` when it names a submodule,
  else (and with `outside=None`) to "other"."""
  return summarize(*model_scopes(config, height, width, batch, variables), outside=outside)


def summarize(scopes: Mapping[str, int], children: Collection[str],
              outside: str | None = "head") -> dict[str, int]:
  """`count_model`'s dict from `model_scopes`' counts and children."""
  groups = group_by_module(scopes, children, outside if outside in children else "other")
  resize = groups.pop(RESIZE, 0)
  groups = sorted(((k, v) for k, v in groups.items() if v), key=lambda kv: -kv[1])
  return {"total": sum(v for _, v in groups), **dict(groups), RESIZE: resize}


def param_counts(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Parameters of `build_model(config.model)` (a run config or its `model` part), from
  `jax.eval_shape` of its init (nothing runs): {"total": ..., then one entry per top-level
  module of the "params" collection (a SegViT: "backbone", "head"), largest first}. Other
  collections (BatchNorm statistics) are state, not parameters, and are not counted."""
  model_cfg = config.model if "model" in config else config
  model = build_model(model_cfg)
  # Parameter shapes do not depend on the input size: any valid input (as `bundle.probe_input`).
  divisor = input_divisor(model_cfg)
  side = divisor * max(2, -(-64 // divisor))
  images = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             images)
  size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
  parts = sorted(((k, size(v)) for k, v in variables["params"].items()), key=lambda kv: -kv[1])
  return {"total": sum(n for _, n in parts), **dict(parts)}


def format_params(counts: Mapping[str, int]) -> str:
  """One line: `parameters: 108,660,742 (backbone 86,389,248, head 22,271,494)`."""
  parts = ", ".join(f"{k} {n:,}" for k, n in counts.items() if k != "total")
  return f"parameters: {counts['total']:,}" + (f" ({parts})" if parts else "")


def format_table(counts: Mapping[str, int], outside_head: int = 0) -> str:
  """The module / GFLOPs / share table of `count_model` counts; `outside_head`: the part of
  "head" done by the root module's own code, shown on a line of its own."""
  total, w = counts["total"], max(map(len, counts))
  rows = [f"{'module':<{w}} {'GFLOPs':>9} {'share':>7}"]
  for name, macs in counts.items():
    if name not in ("total", RESIZE):
      rows.append(f"{name:<{w}} {macs / GIGA:>9.1f} {macs / total:>7.1%}")
    if name == "head" and outside_head:
      rows.append(f"  of which outside the head module: {outside_head / GIGA:.1f}")
  rows.append(f"{'total':<{w}} {total / GIGA:>9.1f} {1:>7.1%}")
  if counts.get(RESIZE):
    rows.append(f"(interpolation as matrix products, not counted: "
                f"{counts[RESIZE] / GIGA:.1f})")
  return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# Training-step FLOPs and the devices' peaks: the model FLOPs utilisation (MFU) that the
# trainer logs (MaxText's convention: analytic FLOPs over the step time, against the peak).

# Dense peak TFLOP/s of one device, by device kind (vendor data sheets, no sparsity), at the
# compute dtype: bfloat16, and float32 as jax computes float32 matrix products by default
# (TF32 tensor cores on NVIDIA GPUs, bfloat16 passes on TPUs).
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.0, "float32": 494.7},
    "H100": {"bfloat16": 989.0, "float32": 494.7},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
    "L4": {"bfloat16": 121.0, "float32": 60.0},
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v6 lite": {"bfloat16": 918.0, "float32": 918.0},
}


def peak_tflops(device_kind: str, dtype: str = "bfloat16") -> float | None:
  """The dense peak TFLOP/s of one device of `device_kind` (`jax.Device.device_kind`, e.g.
  "NVIDIA H100 80GB HBM3", "TPU v5 lite") at the compute `dtype`, from PEAK_TFLOPS (a key
  naming the kind as a whole word); None where unknown (CPUs)."""
  for kind, peaks in PEAK_TFLOPS.items():
    if re.search(rf"(?<!\w){re.escape(kind)}(?!\w)", device_kind):
      return peaks.get(str(dtype))
  return None


def train_step_flops(config: ml_collections.ConfigDict, variables: Any = None) -> int:
  """FLOPs of one training step of a run config, analytically: 3 x the forward pass (the
  backward pass costs about twice the forward) x 2 FLOPs per multiply-add of `count_model` at
  the training crop size (interpolation not counted) x the global batch. Traced from shapes
  (`variables`: as `model_scopes`): nothing compiles or runs."""
  height, width = config.augment.crop_size
  macs = count_model(config, height, width, variables=variables)["total"]
  return 3 * 2 * macs * int(config.batch_size)


# ---------------------------------------------------------------------------------------------
# Command line.

def define_flags() -> None:
  """The command line's flags (`runtime.run` defines them: importing this module defines none)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).",
                                  lock_config=True)
  flags.DEFINE_string("size", None, "Input HxW (default: config.augment.crop_size).")
  flags.mark_flag_as_required("config")


def parse_size(size: str) -> tuple[int, int]:
  """'HxW' or 'S' -> (H, W)."""
  m = re.fullmatch(r"(\d+)(?:x(\d+))?", size)
  if not m:
    raise app.UsageError(f"--size={size}: expected HxW or a side, e.g. 512x683 or 640")
  return int(m[1]), int(m[2] or m[1])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = flags.FLAGS.config
  size = flags.FLAGS.size
  height, width = parse_size(size) if size else config.augment.crop_size
  print(report(config, height, width))


def report(config: ml_collections.ConfigDict, height: int, width: int) -> str:
  """What the command prints: a title line, `format_table`, the parameter count
  (`format_params`) and, last, `GFLOPs: N`."""
  scopes, children = model_scopes(config, height, width)
  counts = summarize(scopes, children)
  outside_head = summarize(scopes, children, None).get("other", 0) if "head" in counts else 0
  model = config.model
  return "\n".join([
      f"{model.get('name', 'segvit')} {model.get('backbone', {}).get('variant', '')} at "
      f"{height}x{width}: multiply-adds, giga = 1e9",
      format_table(counts, outside_head),
      format_params(param_counts(config)),
      f"GFLOPs: {counts['total'] / GIGA:.1f}"])


if __name__ == "__main__":
  sys.exit(runtime.run(main, define_flags=define_flags))
