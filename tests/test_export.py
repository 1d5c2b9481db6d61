"""Deployment exports (`python -m segvit_jax.export`) of tiny random bundles of every family,
at a size that is not a multiple of the patch nor square (40 x 56; EoMT panoptic at its square
model input 64 x 64, the images 40 x 64 inside it):

- ONNX (jax2onnx, symbolic batch) run by onnxruntime at batch 2 and 1: the scores equal
  `Bundle.predict(images, protocol="whole")` (the engine eval.py / predict.py run, float32),
  the raw logits (`--logits`) the JAX function the export converts; EoMT panoptic's class and
  mask logits equal the panoptic evaluation's `MaskPredictor.logits`.
- StableHLO (`jax.export`) deserialised and called in a fresh process that imports jax and
  numpy only (segvit_jax is not in its sys.modules): symbolic batch, height and width
  (`--dynamic`) for every semantic family, one artifact called at 40 x 56 and 72 x 36, batch 2
  and 1, equal to the JAX outputs at each size; EoMT panoptic at its fixed square input.
- Every family includes EoMT on a DINOv3 backbone (rotary position embeddings).
- bfloat16 compute (`--dtype bfloat16`, StableHLO) near the float32 scores.
- The preprocessing in the metadata (ONNX metadata_props, the StableHLO JSON sidecar), the
  command line, and its errors (--dynamic, a whole-image bundle without --height / --width,
  ONNX at float16, an existing OUT).

Tolerance 1e-4 (float32). Measured on the 2-core CPU (before the dynamic / DINOv3 cases): ONNX
vs JAX 1.2e-7 to 6.2e-6 (scores 1.2e-7 to 4.6e-6), StableHLO vs JAX 0 to 4.2e-6 (max |value|
0.45 to 8.5); EoMT on DINOv3 through ONNX 5.4e-7 (scores) to 4.1e-6 (mask logits); the
dynamic SegFormer artifact 1.9e-8 at both sizes. One jax2onnx conversion per
family (shared by the metadata test); the first of a process takes about 20 s (its plugins
load), each later one 1-3 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from configs import common
from segvit_jax import bundle as bundle_lib
from segvit_jax import export
from segvit_jax.evaluation import inference
from segvit_jax.models import build_model

from tests import support

TOL = 1e-4
SIZE = (40, 56)
PANOPTIC_INPUT = (64, 64)
PANOPTIC_IMAGE = (40, 64)  # a long_side-resized image inside the square model input
IMAGENET = dict(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
NUM_CLASSES = 3

VIT = dict(variant="mu/16", depth=2, posemb_grid=(4, 4), cls_in_blocks=False)
HEAD = dict(width=32, num_heads=2)
EOMT = dict(name="eomt", num_classes=NUM_CLASSES, num_queries=4, num_blocks=1,
            backbone=dict(variant="dinov2-S/14-reg4", width=32, depth=2, num_heads=2,
                          mlp_dim=64, patch_size=16, posemb_grid=(4, 4)))
MODELS = {
    "segvit": dict(name="segvit", num_classes=NUM_CLASSES, backbone=VIT,
                   head=dict(HEAD, tap_layers=(0, 1), layers_per_stage=1)),
    "segvit_shrunk": dict(name="segvit", num_classes=NUM_CLASSES,
                          backbone=dict(VIT, shrink_idx=1),
                          head=dict(HEAD, type="shrunk", tap_layers=(0, 1), query_grid=(4, 4),
                                    qu_layers=1, atm_layers=1)),
    "segformer": dict(name="segformer", num_classes=NUM_CLASSES,
                      backbone=dict(variant="B0", depths=(1, 1, 1, 1)), head=dict(width=32)),
    "eomt": EOMT,
    # EoMT on a DINOv3 backbone (rotary position embeddings, no position-embedding resize)
    "eomt_dinov3": dict(EOMT, backbone=dict(variant="dinov3-S/16", width=32, depth=2,
                                            num_heads=2, mlp_dim=64)),
    "eomt_panoptic": EOMT,
}
FAMILIES = list(MODELS)
RAW = {"segvit": ("class_logits", "mask_logits"), "segvit_shrunk": ("class_logits", "mask_logits"),
       "segformer": ("logits",), "eomt": ("class_logits", "mask_logits"),
       "eomt_dinov3": ("class_logits", "mask_logits")}
# The families exported with symbolic height / width (--dynamic) and the second size they are
# called at (SIZE the first): non-square, not multiples of the patch, one side under SIZE's.
DYNAMIC = [name for name in FAMILIES if name != "eomt_panoptic"]
SIZE2 = (72, 36)


def _panoptic_eval() -> dict:
  ev = common.run_config().eval
  ev.update(dict(task="panoptic", resize="long_side", scale=PANOPTIC_INPUT))
  return ev.to_dict()


def _images(size, batch=2, seed=0) -> np.ndarray:
  """uint8 (batch, h, w, 3): a random colour per 8 x 8 block plus noise (scores that vary)."""
  rng = np.random.default_rng(seed)
  blocks = rng.uniform(0, 255, (batch, -(-size[0] // 8), -(-size[1] // 8), 3))
  image = np.repeat(np.repeat(blocks, 8, 1), 8, 2)[:, :size[0], :size[1]]
  return np.clip(image + rng.uniform(-24, 24, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
  """Per family: its bundle, inputs, and the JAX outputs the exports must give."""
  root = tmp_path_factory.mktemp("export")
  out = {}
  for i, name in enumerate(FAMILIES):
    cfg = dict(MODELS[name], dtype="float32")
    model = build_model(cfg)
    variables = flax.linen.meta.unbox(
        jax.jit(model.init)(jax.random.key(i), bundle_lib.probe_input(cfg)))
    # Wider random parameters than the initialisers' (scores that differ between classes).
    params = support.perturbed(variables["params"], seed=100 + i)
    extra = {"eval": _panoptic_eval()} if name == "eomt_panoptic" else {}
    path = bundle_lib.save_bundle(
        str(root / name), params, cfg, **IMAGENET,
        class_names=[f"class_{k}" for k in range(NUM_CLASSES)],
        model_state={k: v for k, v in variables.items() if k != "params"}, **extra)
    b = bundle_lib.load_bundle(path)
    if name == "eomt_panoptic":
      small = _images(PANOPTIC_IMAGE)
      images = np.zeros((2, *PANOPTIC_INPUT, 3), np.uint8)  # the caller pads with black
      images[:, :PANOPTIC_IMAGE[0], :PANOPTIC_IMAGE[1]] = small
      predictor = inference.MaskPredictor(
          lambda v, x: (lambda o: (o["class_logits"], o["mask_logits"]))(b.model.apply(v, x)),
          b.variables, PANOPTIC_INPUT, **IMAGENET, batch=2)
      want = dict(zip(("class_logits", "mask_logits"),
                      (np.asarray(a) for a in predictor.logits(list(small)))))
    else:
      images = _images(SIZE)
      want = _jax_outputs(b, images)
    out[name] = dict(path=path, bundle=b, images=images, want=want)
    if name in DYNAMIC:
      out[name]["images2"] = _images(SIZE2, seed=1)
      out[name]["want2"] = _jax_outputs(b, out[name]["images2"])
  out["root"] = root
  return out


def _jax_outputs(b: bundle_lib.Bundle, images: np.ndarray) -> dict:
  """The scores `Bundle.predict(images, protocol="whole")` gives, and the raw logits of the JAX
  function the exports are made from."""
  want = {"scores": b.predict(images, protocol="whole")}
  assert want["scores"].std(axis=(-2, -1)).mean() > 1e-3  # scores vary over pixels
  sig = export.Signature(*images.shape[1:3], batch=len(images), logits=True)
  got = jax.jit(export.forward_fn(b, sig))(images)
  want.update(zip(export.output_names(b, True)[1:], (np.asarray(a) for a in got[1:])))
  return want


def _check(name: str, got: dict, want: dict, what: str) -> None:
  for key, value in want.items():
    for batch in (2, 1):
      diff = support.max_diff(got[batch][key], value[:batch])
      print(f"{name} {what} {key} batch {batch}: max |value| {np.abs(value).max():.2f}, "
            f"max abs diff {diff:.1e}")
      assert diff < TOL, (name, what, key, batch, diff)


def _onnx(cases: dict, name: str) -> str:
  """The family's ONNX export (symbolic batch, with its logits), converted once per module."""
  out = str(cases["root"] / f"{name}.onnx")
  if not os.path.exists(out):
    logits = name != "eomt_panoptic"  # (a panoptic bundle exports its logits only)
    files = export.export(cases[name]["path"], out, "onnx", batch=None, logits=logits,
                          **({} if name == "eomt_panoptic" else dict(height=SIZE[0],
                                                                     width=SIZE[1])))
    assert files == [out]
  return out


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_equals_the_jax_outputs(cases, name):
  case = cases[name]
  out = _onnx(cases, name)
  model = onnx.load(out)
  assert model.opset_import[0].version >= 17
  session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
  names = [o.name for o in session.get_outputs()]
  expected = (("class_logits", "mask_logits") if name == "eomt_panoptic" else
              ("scores", *RAW[name]))
  assert tuple(names) == expected
  (inp,) = session.get_inputs()
  assert inp.name == "images" and inp.type == "tensor(uint8)", (inp.name, inp.type)
  assert inp.shape[0] == "batch" and tuple(inp.shape[1:]) == (*case["images"].shape[1:3], 3)
  got = {batch: dict(zip(names, session.run(None, {"images": case["images"][:batch]})))
         for batch in (2, 1)}
  _check(name, got, case["want"], "onnx")


def test_onnx_metadata_records_the_preprocessing(cases):
  props = {p.key: p.value for p in onnx.load(_onnx(cases, "eomt")).metadata_props}
  meta = json.loads(props["segvit_jax"])
  assert json.loads(props["mean"]) == list(IMAGENET["mean"]) == meta["mean"]
  assert json.loads(props["std"]) == list(IMAGENET["std"]) == meta["std"]
  assert props["size_rule"] == meta["size_rule"]
  assert "padded inside to multiples of 16 (black pixels), scores back by crop" in \
      meta["size_rule"]
  assert meta["padding"] == {"multiple": 16, "fill": "black", "back": "crop"}
  assert meta["input"] == {"name": "images", "shape": ["batch", *SIZE, 3], "dtype": "uint8",
                           "layout": "NHWC RGB", "normalised": False}
  assert meta["outputs"] == {"scores": ["batch", NUM_CLASSES, *SIZE],
                             "class_logits": ["batch", 4, NUM_CLASSES + 1],
                             "mask_logits": ["batch", 4, 12, 16]}  # (1/4 of 48 x 64)
  assert meta["family"] == "eomt" and meta["test_protocol"] is None
  assert meta["class_names"] == ["class_0", "class_1", "class_2"]


# The fresh process: jax and numpy only. It calls every artifact on each of its image files
# (one size each) at batch 2 and 1 and saves the outputs.
CALLER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jobs = json.loads(sys.argv[1])
    for artifact, calls in jobs:
      exp = jax.export.deserialize(open(artifact, "rb").read())
      names = list(json.load(open(artifact + ".json"))["outputs"])
      for images, result in calls:
        x = np.load(images)
        out = {}
        for batch in (2, 1):
          for k, v in zip(names, exp.call(x[:batch])):
            out[f"{k}/{batch}"] = np.asarray(v)
        np.savez(result, **out)
    assert not [m for m in sys.modules if m.startswith("segvit_jax")], "imported segvit_jax"
    print("RESULT", json.dumps({"platforms": list(exp.platforms),
                                "segvit_jax": "segvit_jax" in sys.modules}))
""")


def test_stablehlo_runs_without_the_models_code(cases):
  """Symbolic batch, height and width (--dynamic) for the DYNAMIC families, called at SIZE and
  SIZE2; EoMT panoptic at its fixed square input."""
  root = cases["root"]
  jobs = []
  for name in FAMILIES:
    case = cases[name]
    out = str(root / f"{name}.stablehlo")
    size = (dict(dynamic=True) if name in DYNAMIC else {} if name == "eomt_panoptic" else
            dict(height=SIZE[0], width=SIZE[1]))
    files = export.export(case["path"], out, "stablehlo", batch=None,
                          logits=name != "eomt_panoptic", **size)
    assert files == [out, out + ".json"]
    calls = []
    for key in ("images", "images2") if name in DYNAMIC else ("images",):
      np.save(root / f"{name}_{key}.npy", case[key])
      calls.append((str(root / f"{name}_{key}.npy"), str(root / f"{name}_{key}_result.npz")))
    jobs.append((out, calls))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **support.cache_env()}
  proc = subprocess.run([sys.executable, "-c", CALLER, json.dumps(jobs)], capture_output=True,
                        text=True, env=env, timeout=600, cwd=str(root))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.split("RESULT ")[-1])
  assert result == {"platforms": ["cpu", "cuda"], "segvit_jax": False}
  for name, (_, calls) in zip(FAMILIES, jobs):
    for (_, npz), key in zip(calls, ("want", "want2")):
      saved = np.load(npz)
      want = cases[name][key]
      got = {batch: {k: saved[f"{k}/{batch}"] for k in want} for batch in (2, 1)}
      size = "x".join(map(str, want["scores"].shape[2:])) if "scores" in want else "fixed"
      _check(name, got, want, f"stablehlo {size}")
  meta = json.load(open(jobs[FAMILIES.index(DYNAMIC[0])][0] + ".json"))
  assert meta["input"]["shape"] == ["batch", "height", "width", 3]
  assert meta["outputs"]["scores"] == ["batch", NUM_CLASSES, "height", "width"]
  assert f"any HxW, both at least {export.MIN_SIZE}" in meta["size_rule"]
  assert meta["mean"] == list(IMAGENET["mean"]) and meta["std"] == list(IMAGENET["std"])
  assert "jax.export.deserialize" in meta["calling_convention"]


def test_command_line(cases, capsys):
  case, root = cases["segformer"], cases["root"]
  out = str(root / "cli.onnx")
  argv = [case["path"], out, "--format", "onnx", "--height", str(SIZE[0]), "--width",
          str(SIZE[1]), "--batch", "2"]
  assert export.cli(argv) == 0
  assert f"wrote {out}" in capsys.readouterr().out
  session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
  diff = support.max_diff(session.run(None, {"images": case["images"]})[0], case["want"]["scores"])
  assert diff < TOL, diff
  # normalised float input, a symbolic batch (the dash spelling), StableHLO
  out = str(root / "cli_float.stablehlo")
  assert export.cli([case["path"], out, "--format", "stablehlo", "--height", str(SIZE[0]),
                     "--width", str(SIZE[1]), "--dynamic-batch", "--input", "float",
                     "--platforms", "cpu"]) == 0
  x = (case["images"].astype(np.float32) - np.float32(IMAGENET["mean"])) / np.float32(
      IMAGENET["std"])
  exp = jax.export.deserialize(open(out, "rb").read())
  assert exp.in_avals[0].dtype == jnp.float32
  diff = support.max_diff(exp.call(x)[0], case["want"]["scores"])
  assert diff < TOL, diff
  # bfloat16 compute (parameters as stored, outputs float32): near the float32 scores
  out = str(root / "cli_bf16.stablehlo")
  assert export.cli([case["path"], out, "--format", "stablehlo", "--height", str(SIZE[0]),
                     "--width", str(SIZE[1]), "--batch", "2", "--dtype", "bfloat16",
                     "--platforms", "cpu"]) == 0
  assert json.load(open(out + ".json"))["compute_dtype"] == "bfloat16"
  scores = jax.export.deserialize(open(out, "rb").read()).call(case["images"])[0]
  assert scores.dtype == jnp.float32
  diff = support.max_diff(scores, case["want"]["scores"])
  print(f"segformer bfloat16 vs float32 scores: max abs diff {diff:.1e} (max |value| "
        f"{np.abs(case['want']['scores']).max():.2f})")
  assert 0 < diff < 0.1, diff  # measured 0.059 (bfloat16 compute, tiny random SegFormer)


@pytest.mark.parametrize("args, message", [
    (["--format", "onnx", "--dynamic"], "--format onnx --dynamic: the ONNX export has fixed"),
    (["--format", "stablehlo", "--dynamic", "--height", "40"],
     "--dynamic makes height and width symbolic: give neither"),
    (["--format", "onnx"], "the bundle records no window size"),
    (["--format", "onnx", "--height", "40", "--width", "56", "--dtype", "float16"],
     "--format onnx --dtype float16: ONNX exports compute in float32"),
    (["--format", "stablehlo", "--height", "40", "--width", "56", "--dtype", "float16"],
     "--dtype float16 does not lower for the CPU"),
    (["--format", "onnx", "--height", "40", "--width", "56", "--batch", "2",
      "--dynamic_batch"], "give --batch B or --dynamic_batch, not both"),
    (["--format", "onnx", "--height", "0", "--width", "56"], "--height=0: expected a positive"),
])
def test_bad_requests_are_one_error_line(cases, capsys, args, message):
  out = str(cases["root"] / "bad.onnx")
  assert export.cli([cases["segformer"]["path"], out, *args]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0], err
  assert not os.path.exists(out)


def test_an_existing_output_is_refused(cases, capsys):
  out = cases["root"] / "existing.onnx"
  out.write_bytes(b"keep")
  assert export.cli([cases["segvit"]["path"], str(out), "--format", "onnx", "--height", "40",
                     "--width", "56"]) == 1
  assert "pass --overwrite to replace it" in capsys.readouterr().err
  assert out.read_bytes() == b"keep"
