r"""Deployment exports of a model bundle: the whole-image forward pass as an ONNX model or a
serialized StableHLO program (`jax.export`), each with its preprocessing recorded.

  python -m segvit_jax.export BUNDLE OUT --format onnx|stablehlo [--height H --width W]
      [--batch B | --dynamic_batch] [--dynamic] [--dtype float32|bfloat16|float16]
      [--input uint8|float] [--logits] [--platforms cpu,cuda]

(`segvit_jax.export_bundle` is another thing: it writes the bundle this module exports from.)

What is exported, for every family (SegViT, SegViT-Shrunk, SegFormer, EoMT): `forward(images)`,
images (B, H, W, 3) uint8 RGB (`--input uint8`, normalised inside with the bundle's mean / std)
or float32 already normalised (`--input float`), through the engine's whole-image inference
(`evaluation.inference.whole_inference`): padded bottom / right by the family's reference rule
(`models.PADDING_RULES`), one forward pass, the scores brought back to (H, W). The outputs, in
this order (the metadata's "outputs" names them with their shapes):

  scores        (B, C, H, W) float32 per-class scores, what `Bundle.predict(images,
                protocol="whole")` returns (`--logits` adds the raw model outputs:)
  class_logits  (B, K, C + 1) float32 (SegViT, Shrunk, EoMT; the last class is no-object)
  mask_logits   (B, K, h, w) float32 of the padded input: EoMT's at 1/4 of it (the up-scaling
                head's grid), SegViT's at its full size
  logits        (B, C, H' / 4, W' / 4) float32 (SegFormer's decoder output, before the resize)

An EoMT bundle whose config.json records `eval.task` "panoptic" / "instance" exports
`class_logits` and `mask_logits` only (the inputs of EoMT's panoptic post-processing,
`evaluation.panoptic`), at the square model input `eval.scale` by default.

Sizes: H x W is fixed (default: the window the recorded protocol runs the model on,
`eval.crop_size`; for panoptic `eval.scale`), or, for StableHLO, symbolic (`--dynamic`: any
height and width of at least MIN_SIZE, one artifact; `jax.export` shape polymorphism). With
symbolic sizes the padding rule is traced, and the resizes (position embeddings, SegFormer's
decoder, the masks, the scores) build their interpolation matrices in jnp from the sizes
(`models.layers.symbolic_resize_matrix`; the numpy matrices of fixed sizes stay as they are),
as do DINOv3's rotary coordinates. ONNX keeps a fixed H x W (`--dynamic` is an error saying
so). The batch may be symbolic (`--dynamic_batch`; ONNX dimension "batch", StableHLO "b").

Compute dtype (`--dtype`; parameters stay as stored, outputs float32): ONNX float32 only
(jax2onnx writes float16 convolutions with float32 kernels, which onnxruntime rejects, and
onnxruntime's CPU provider has no bfloat16 Conv); StableHLO any, float16 not for the CPU.

Formats (README, "Deploying"):
  onnx       OUT (ONNX, opset 17) converted by jax2onnx from the same JAX function; the
             preprocessing is in the model's metadata_props ("segvit_jax": the JSON below, and
             its keys "mean", "std", "size_rule" on their own). Weights over 2 GB go to
             OUT.data beside it (ONNX's external data).
  stablehlo  OUT: `jax.export.export(jax.jit(forward))(...).serialize()` bytes, the weights
             inside as constants, lowered for `--platforms`; OUT.json beside it holds the
             metadata. Load and call without this package:
               exp = jax.export.deserialize(open(OUT, "rb").read())
               scores, *logits = exp.call(images)

The metadata (JSON): format, family, bundle, classes, mean, std, input (dtype, layout, range),
outputs, padding (the family's rule: multiple, fill, back), test_protocol (the bundle's
recorded `eval`, or null), size_rule (in words: what the caller does before calling).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from segvit_jax import bundle as bundle_lib
from segvit_jax import runtime
from segvit_jax.evaluation import inference
from segvit_jax.models import DTYPES, build_model, family, input_padding

FORMATS = ("onnx", "stablehlo")
INPUTS = ("uint8", "float")
OPSET = 17
# The smallest symbolic height / width (--dynamic): SegFormer-B0's first stage reduces its
# keys by 8 on the 1/4 grid (mit.py refuses grids under 8), so 32 pixels.
MIN_SIZE = 32
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
MASK_TASKS = ("panoptic", "instance")
# ONNX's protobuf limit: bigger models keep their weights in external data.
ONNX_INLINE_BYTES = 2 ** 31 - 2 ** 26
DYNAMIC_ONNX = ("--format onnx --dynamic: the ONNX export has fixed height / width (symbolic "
                "spatial sizes are for --format stablehlo): export --height H --width W")
PROG = "python -m segvit_jax.export"
USAGE = f"usage: {PROG} BUNDLE OUT --format {'|'.join(FORMATS)} [flags]"
ALIASES = {"dynamic-batch": "dynamic_batch"}


@dataclasses.dataclass(frozen=True)
class Signature:
  """The exported function's input (batch None: symbolic; height and width None: symbolic,
  at least `MIN_SIZE`) and what it returns."""
  height: int | None
  width: int | None
  batch: int | None = 1
  dtype: str = "float32"
  input_type: str = "uint8"
  logits: bool = False

  def __post_init__(self):
    if (self.height is None) != (self.width is None):
      raise ValueError("height and width are both symbolic (--dynamic) or both given")
    for name in ("height", "width") if self.height is not None else ():
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"--{name}={getattr(self, name)!r}: expected a positive integer")
    if self.batch is not None and (not isinstance(self.batch, int) or self.batch < 1):
      raise ValueError(f"--batch={self.batch!r}: expected a positive integer (or "
                       "--dynamic_batch)")
    if self.dtype not in DTYPES:
      raise ValueError(f"--dtype={self.dtype!r}: expected one of {tuple(DTYPES)}")
    if self.input_type not in INPUTS:
      raise ValueError(f"--input={self.input_type!r}: expected one of {INPUTS}")


  @property
  def dynamic(self) -> bool:
    return self.height is None


def task(b: bundle_lib.Bundle) -> str:
  """The bundle's recorded `eval.task` ("semantic" where it records none)."""
  ev = b.config.get("eval")
  return (ev.get("task") if ev is not None else None) or "semantic"


def output_names(b: bundle_lib.Bundle, logits: bool) -> tuple[str, ...]:
  """The exported function's outputs, in order (module docstring)."""
  name = family(b.config.model)
  if name == "eomt" and task(b) in MASK_TASKS:
    return ("class_logits", "mask_logits")
  raw = ("logits",) if name == "segformer" else ("class_logits", "mask_logits")
  return ("scores", *raw) if logits else ("scores",)


def default_size(b: bundle_lib.Bundle) -> tuple[int, int] | None:
  """The input size a bundle's recorded protocol runs its model at: the square model input
  (`eval.scale`) for EoMT panoptic / instance, the window (`eval.crop_size`) of a windowed
  protocol; None otherwise (whole-image protocols take images of any size)."""
  ev = b.config.get("eval")
  if ev is None:
    return None
  if family(b.config.model) == "eomt" and task(b) in MASK_TASKS:
    return tuple(int(v) for v in ev.scale)
  if ev.get("mode") in ("slide", "spread"):
    return tuple(int(v) for v in ev.crop_size)
  return None


def forward_fn(b: bundle_lib.Bundle, sig: Signature) -> Callable:
  """The exported function: images (B, H, W, 3) -> the `output_names` arrays (module
  docstring), the bundle's variables closed over (constants of the export)."""
  if family(b.config.model) == "vit":
    raise ValueError("this is a backbone bundle (no decode head): only whole-model bundles "
                     "(SegViT, SegFormer, EoMT) export")
  model = build_model({**b.config.model.to_dict(), "dtype": sig.dtype})
  variables = b.variables
  padding = input_padding(b.config.model)
  mean = np.asarray(b.config.mean, np.float32)
  std = np.asarray(b.config.std, np.float32)
  fill = inference.pad_value(padding, mean, std)
  names = output_names(b, sig.logits)

  def forward(images):
    x = images
    if sig.input_type == "uint8":
      x = (images.astype(jnp.float32) - mean) / std
    out = {}

    def score_fn(x):  # called once (one window); its other outputs are kept for `names`
      out.update(model.apply(variables, x))
      return out["semantic_scores"]

    scores = inference.whole_inference(score_fn, x.astype(jnp.float32), padding.multiple,
                                       back=padding.back, fill=fill)
    return tuple((scores if k == "scores" else out[k]).astype(jnp.float32) for k in names)

  return forward


def input_spec(sig: Signature, batch_name: str) -> jax.ShapeDtypeStruct:
  """The input's shape and dtype; a symbolic batch named `batch_name` when `sig.batch` is None,
  symbolic "height" / "width" (each at least MIN_SIZE) when `sig.dynamic`."""
  dims = [batch_name if sig.batch is None else str(sig.batch)]
  dims += ["height", "width"] if sig.dynamic else [str(sig.height), str(sig.width)]
  constraints = [f"{d} >= {MIN_SIZE}" for d in ("height", "width")] if sig.dynamic else []
  shape = jax.export.symbolic_shape(", ".join(dims + ["3"]), constraints=constraints)
  dtype = jnp.uint8 if sig.input_type == "uint8" else jnp.float32
  return jax.ShapeDtypeStruct(shape, dtype)


def output_shapes(b: bundle_lib.Bundle, sig: Signature) -> dict[str, list]:
  """{output: shape} of the export: integers, and for symbolic sizes their expressions in
  "batch", "height", "width" (e.g. "floordiv(height + 15, 16)*4")."""
  shapes = jax.eval_shape(forward_fn(b, sig), input_spec(sig, "batch"))
  return {k: [d if isinstance(d, int) else str(d) for d in s.shape]
          for k, s in zip(output_names(b, sig.logits), shapes)}


def size_rule(b: bundle_lib.Bundle, sig: Signature) -> str:
  """What the caller does to an image before calling the export, in words."""
  ev = b.config.get("eval")
  size = (f"any HxW, both at least {MIN_SIZE}" if sig.dynamic else
          f"{sig.height}x{sig.width} (HxW)")
  norm = ("uint8 RGB, 0..255" if sig.input_type == "uint8" else
          "float32 RGB normalised: (pixel - mean) / std")
  padding = input_padding(b.config.model)
  inside = (f"padded inside to multiples of {padding.multiple} "
            f"({'black pixels' if padding.fill == 'black' else 'zeros after normalising'}), "
            f"scores back by {padding.back}" if padding.multiple > 1 else "no padding")
  if family(b.config.model) == "eomt" and task(b) in MASK_TASKS:
    long = max(ev.scale) if sig.dynamic else max(sig.height, sig.width)
    how = (f"resize the longer side to {long} keeping the aspect ratio "
           f"(eval.resize long_side, scale {tuple(ev.scale)}), pad with black pixels at the "
           f"bottom / right to {size}; outputs are the logits of that padded input")
  elif ev is None:
    how = f"the image at {size} as it is (no test protocol recorded)"
  else:
    how = (f"the recorded protocol (eval.resize {ev.resize}, scale {tuple(ev.scale)}, mode "
           f"{ev.mode}, crop {tuple(ev.crop_size)}, stride {tuple(ev.stride)}) gives the "
           f"{size} inputs: a window of the test-resized image, or the whole image resized "
           f"to {size}")
  return f"NHWC {norm}; {how}; {inside}"


def metadata(b: bundle_lib.Bundle, sig: Signature, fmt: str, source: str) -> dict[str, Any]:
  """The export's metadata (module docstring)."""
  ev = b.config.get("eval")
  padding = input_padding(b.config.model)
  batch = "batch" if sig.batch is None else sig.batch
  return {
      "format": f"segvit_jax.export/{fmt}",
      "family": family(b.config.model),
      "task": task(b),
      "bundle": os.path.abspath(source) if source else None,
      "class_names": list(b.config.get("class_names") or []),
      "mean": [float(v) for v in b.config.mean],
      "std": [float(v) for v in b.config.std],
      "input": {"name": "images", "shape": [batch, *(("height", "width") if sig.dynamic else
                                                     (sig.height, sig.width)), 3],
                "dtype": "uint8" if sig.input_type == "uint8" else "float32",
                "layout": "NHWC RGB", "normalised": sig.input_type == "float"},
      "outputs": output_shapes(b, sig),
      "compute_dtype": sig.dtype,
      "padding": dataclasses.asdict(padding),
      "test_protocol": ev.to_dict() if ev is not None else None,
      "size_rule": size_rule(b, sig),
  }


def _json(o: Any) -> Any:
  return list(o) if isinstance(o, tuple) else str(o)


def export_onnx(b: bundle_lib.Bundle, out: str, sig: Signature, meta: dict[str, Any]) -> list[str]:
  """Writes the ONNX model (jax2onnx, opset `OPSET`) with `meta` in its metadata_props; returns
  the files written."""
  try:
    import jax2onnx  # pylint: disable=import-outside-toplevel
    import onnx  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"--format onnx needs jax2onnx and onnx ({e}): pip install -e "
                      "'.[export]' && pip install --no-deps jax2onnx==0.17.1") from None
  names = output_names(b, sig.logits)
  # jax2onnx's IR library warns once per shape value it leaves untyped (hundreds of lines with
  # a symbolic batch; the model is complete and checked by onnxruntime in the tests).
  logging.getLogger("onnx_ir").setLevel(logging.ERROR)
  model = jax2onnx.to_onnx(forward_fn(b, sig), [input_spec(sig, "batch")],
                           model_name=f"segvit_jax_{meta['family']}", opset=OPSET,
                           input_names=["images"], output_names=list(names))
  props = {"segvit_jax": json.dumps(meta, default=_json), "mean": json.dumps(meta["mean"]),
           "std": json.dumps(meta["std"]), "size_rule": meta["size_rule"]}
  for key, value in props.items():
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value
  weights = sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)  # (float32)
  tmp, data = out + ".tmp", out + ".data"
  if weights > ONNX_INLINE_BYTES:  # OUT.data, named relative to OUT's folder
    onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(data), size_threshold=1024)
  else:
    onnx.save_model(model, tmp)
  os.replace(tmp, out)
  return [out, data] if weights > ONNX_INLINE_BYTES else [out]


def export_stablehlo(b: bundle_lib.Bundle, out: str, sig: Signature, meta: dict[str, Any],
                     platforms: Sequence[str]) -> list[str]:
  """Writes the serialized `jax.export` artifact and its metadata sidecar OUT.json; returns
  the files written."""
  exported = jax.export.export(jax.jit(forward_fn(b, sig)), platforms=tuple(platforms))(
      input_spec(sig, "b"))
  meta = {**meta, "platforms": list(exported.platforms),
          "calling_convention": (
              "exp = jax.export.deserialize(open(OUT, 'rb').read()); outputs = "
              "exp.call(images): a tuple in the order of 'outputs'"),
          "jax_version": jax.__version__,
          "serialization_version": exported.calling_convention_version}
  _write(out, exported.serialize())
  _write(out + ".json", json.dumps(meta, indent=2, default=_json).encode())
  return [out, out + ".json"]


def _write(path: str, data: bytes) -> None:
  """Writes `path` through a temporary file beside it (a failed write leaves no half file)."""
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def export(b: bundle_lib.Bundle | str, out: str, fmt: str, *, height: int | None = None,
           width: int | None = None, batch: int | None = 1, dtype: str = "float32",
           input_type: str = "uint8", logits: bool = False,
           platforms: Sequence[str] = ("cpu", "cuda"), dynamic: bool = False) -> list[str]:
  """Exports bundle `b` (a `Bundle` or its path) as `fmt` (FORMATS) to `out`; returns the
  files written. `height` / `width` default to `default_size`; `batch` None is symbolic;
  `dynamic` makes height and width symbolic (StableHLO only)."""
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r}: expected one of {FORMATS}")
  bad = [p for p in platforms if p not in PLATFORMS]
  if bad or not platforms:
    raise ValueError(f"--platforms={','.join(platforms)}: expected some of {PLATFORMS}")
  source = b if isinstance(b, str) else None
  if isinstance(b, str):
    b = bundle_lib.load_bundle(b)
  if dynamic:
    if height is not None or width is not None:
      raise ValueError("--dynamic makes height and width symbolic: give neither --height nor "
                       "--width")
    if fmt == "onnx":
      raise ValueError(DYNAMIC_ONNX)
  elif (height is None) != (width is None):
    raise ValueError("give both --height and --width, or neither (the bundle's window)")
  if height is None and not dynamic:
    size = default_size(b)
    if size is None:
      raise ValueError("the bundle records no window size (its test protocol is the whole "
                       "image, or none): give --height H --width W")
    height, width = size
  sig = Signature(height, width, batch, dtype, input_type, logits)
  if fmt == "onnx" and dtype != "float32":
    raise ValueError(
        f"--format onnx --dtype {dtype}: ONNX exports compute in float32 (jax2onnx writes "
        "float16 convolutions with float32 kernels, which onnxruntime rejects; onnxruntime's "
        "CPU kernels have no bfloat16 Conv): export float32 and let the runtime reduce it "
        "(TensorRT: trtexec --fp16)")
  if fmt == "stablehlo" and dtype == "float16" and "cpu" in platforms:
    raise ValueError("--dtype float16 does not lower for the CPU (XLA's CPU dot has no "
                     "float16 x float16 -> float32 precision): --platforms cuda, or --dtype "
                     "bfloat16")
  meta = metadata(b, sig, fmt, source)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  if fmt == "onnx":
    return export_onnx(b, out, sig, meta)
  return export_stablehlo(b, out, sig, meta, platforms)


# ----------------------------------------------------------------------------------------------
# The command line.


def define_flags() -> None:
  """The command line's flags (`runtime.run` defines them: importing this module defines none)."""
  flags.DEFINE_enum("format", None, list(FORMATS), "onnx or stablehlo (jax.export).")
  flags.DEFINE_integer("height", None, "Input height (default: the bundle's eval window).")
  flags.DEFINE_integer("width", None, "Input width (default: the bundle's eval window).")
  flags.DEFINE_bool("dynamic", False, f"stablehlo: symbolic height / width (each at least "
                    f"{MIN_SIZE}) instead of --height / --width.")
  flags.DEFINE_integer("batch", 1, "Batch size of the input.")
  flags.DEFINE_bool("dynamic_batch", False, "A symbolic batch size instead of --batch.")
  flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Compute dtype (parameters stay as "
                    "stored; outputs are float32).")
  flags.DEFINE_enum("input", "uint8", list(INPUTS), "uint8: RGB 0..255, normalised inside; "
                    "float: float32 already normalised with the bundle's mean / std.")
  flags.DEFINE_bool("logits", False, "Also output the raw class / mask logits (SegFormer: "
                    "its decoder logits).")
  flags.DEFINE_list("platforms", ["cpu", "cuda"], f"stablehlo: platforms to lower for (some "
                    f"of {', '.join(PLATFORMS)}).")
  flags.DEFINE_bool("overwrite", False, "Replace OUT if it exists.")
  for alias, name in ALIASES.items():
    flags.DEFINE_alias(alias, name)


def main(argv: Sequence[str]) -> None:
  if len(argv) != 3:
    raise app.UsageError(f"expected BUNDLE and OUT, got {len(argv) - 1} argument(s); {USAGE}")
  fv = flags.FLAGS
  bundle_path, out = argv[1:]
  if fv.format is None:
    raise app.UsageError(f"--format is required; {USAGE}")
  if fv.dynamic_batch and fv["batch"].present:
    raise ValueError("give --batch B or --dynamic_batch, not both")
  runtime.refuse_overwrite(out, fv.overwrite)
  files = export(bundle_path, out, fv.format, height=fv.height, width=fv.width,
                 batch=None if fv.dynamic_batch else fv.batch, dtype=fv.dtype,
                 input_type=fv.input, logits=fv.logits, platforms=tuple(fv.platforms),
                 dynamic=fv.dynamic)
  print("wrote " + ", ".join(files))


def cli(argv: Sequence[str] | None = None) -> int:
  """The command line (`argv` without the program name): 0 on success, 1 with one line on
  stderr for a user's mistake."""
  return runtime.run(main, argv, define_flags=define_flags)


if __name__ == "__main__":
  sys.exit(cli())
