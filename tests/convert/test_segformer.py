"""SegFormer checkpoints both ways (segvit_jax/convert/segformer.py) against transformers'
SegformerForSemanticSegmentation.

References: randomly initialised transformers models (a B0 and a deeper model of B2's widths,
classes != 150), every parameter and the BatchNorm running statistics perturbed, saved with
`save_pretrained`, run in float64 on their float32 weights. The release's layout is written
from the saved state dict by tests/checkpoint_writers.py (`segformer_official_state_dict`, an
independent key mapping; key / value packed in `attn.kv`) and saved as mmseg does
(`state_dict`, `meta`, `optimizer`).

- `--from hf-segformer`: our logits equal transformers' at 128 x 128 and 96 x 160 (the
  model's parity at 512 x 512 and 384 x 640 is tests/models/test_segformer_vs_hf.py's).
- `--to hf-segformer`: `from_pretrained` loads the directory with no missing or unexpected keys,
  the saved tensors are bitwise the original's and the logits are the reference's.
- `--from segformer-official`: the bundle records the release's LayerNorm eps 1e-6 and
  reproduces transformers run at that eps; with eps 1e-5 it reproduces transformers as is. The
  difference the eps alone makes is measured (float64, transformers at both eps).
- Round trips bundle -> official -> bundle and bundle -> HF -> bundle are bitwise (params and
  batch_stats), across layouts too.
- `config.model_init`: an ImageNet `mit_bX.pth`, an HF directory or a bundle give a SegFormer
  (and a SegViT on MiT) its backbone, strictly; the head stays fresh; wrong files name keys.
- predict.py runs on a converted bundle.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.numpy import load_file

from segvit_jax import bundle, config_utils, convert
from segvit_jax.convert import rules, segformer
from segvit_jax.data import cityscapes
from segvit_jax.models import build_model

from tests import checkpoint_writers as writers
from tests import support
from tests.torch_reference import randomize_module_ as randomize_segformer_

ROOT = support.ROOT
TOL = 1e-4  # float32 Flax vs float64 torch
# name -> transformers config fields
CONFIGS = {
    "b0": dict(num_labels=19),
    # B2's widths and decoder width, deeper than B0 (B2 itself: 3, 4, 6, 3), to stay fast.
    "b2_like": dict(num_labels=37, hidden_sizes=[64, 128, 320, 512], depths=[2, 3, 4, 2],
                    decoder_hidden_size=768),
}
SIZES = [(128, 128), (96, 160)]  # small: CI time; 512 / 384x640 in test_segformer_vs_hf
EXPORT_SIZE = (64, 96)  # from_pretrained of the export: bitwise the same weights, any size
NUM_BATCHES_TRACKED = 1234

# A config a user would pass with --config: the B0's model, Cityscapes' 19 class names and
# pixel statistics of its own. ":deeper" describes another model.
CONFIG_FILE = '''
import ml_collections

from configs import common


def get_config(arg="b0"):
  c = common.run_config()
  c.dataset.update(name="cityscapes", num_classes=19)
  c.model = ml_collections.ConfigDict(dict(
      name="segformer", num_classes=19, backbone=dict(variant="B0"),
      head=dict(width=256, dropout=0.1)))
  c.mean, c.std = (120.0, 110.0, 100.0), (50.0, 51.0, 52.0)
  if arg == "deeper":
    c.model.backbone.depths = (2, 2, 3, 2)
  return c
'''


def _randomize_(model: torch.nn.Module, seed: int) -> None:
  """test_segformer_vs_hf's randomisation (every parameter, BatchNorm running statistics), and
  the BatchNorm step counter set."""
  randomize_segformer_(model, seed)
  with torch.no_grad():
    for name, b in model.named_buffers():
      if name.endswith("num_batches_tracked"):
        b.fill_(NUM_BATCHES_TRACKED)


def _set_block_norm_eps_(model: torch.nn.Module, eps: float) -> None:
  """The release's eps on the LayerNorms it builds with 1e-6 (block norms, stage-closing
  norms); the patch-embedding and key / value reduction norms keep 1e-5, as in the release.
  Module names in memory (transformers 5.x: `stages.{s}.blocks.{j}.layernorm_before`, ...)
  differ from the saved ones (`encoder.block.{s}.{j}.layer_norm_1`): both are matched."""
  block = re.compile(r".*\.(layernorm_before|layernorm_after|layer_norm_1|layer_norm_2)")
  stage = re.compile(r"segformer\.(stages\.\d+\.layer_norm|encoder\.layer_norm\.\d+)")
  changed = 0
  for name, module in model.named_modules():
    if isinstance(module, torch.nn.LayerNorm) and (block.fullmatch(name) or stage.fullmatch(name)):
      module.eps = eps
      changed += 1
  config = model.config
  assert changed == 2 * sum(config.depths) + config.num_encoder_blocks, changed


def _images(h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((1, h, w, 3)).astype(np.float32)


def _torch_logits(model, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(images).permute(0, 3, 1, 2).double()).logits.numpy()


def _our_logits(model, variables, images: np.ndarray) -> np.ndarray:
  with jax.default_matmul_precision("highest"):
    out = jax.jit(lambda v, x: model.apply(v, x)["logits"])(variables, images)
  return np.asarray(out, np.float64)


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _assert_bitwise(first: dict, second: dict, what: str) -> None:
  f1, f2 = _flat(first), _flat(second)
  assert sorted(f1) == sorted(f2), what
  unequal = [k for k in f1 if not np.array_equal(f1[k], f2[k]) or f1[k].dtype != f2[k].dtype]
  assert not unequal, (what, unequal)


def _variables(path: str) -> dict:
  return {"params": bundle.load_params(path), **bundle.load_model_state(path)}


def _with_eps(model_cfg, eps: float):
  cfg = copy.deepcopy(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
  cfg["backbone"]["norm_eps"] = eps
  return build_model(cfg)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("configs") / "segformer_tiny.py"
  path.write_text(CONFIG_FILE)
  return str(path)


def _reference(name: str, root) -> dict:
  """One reference model: its save_pretrained directory, the release-layout file written from
  it and its float64 logits (at SIZES; at eps 1e-6 at the first size; at EXPORT_SIZE)."""
  fields = CONFIGS[name]
  k = fields["num_labels"]
  labels = {i: f"thing_{i}" for i in range(k)}
  torch.manual_seed(0)
  config = transformers.SegformerConfig(**fields, id2label=labels,
                                        label2id={v: i for i, v in labels.items()})
  hf = transformers.SegformerForSemanticSegmentation(config).eval()
  _randomize_(hf, seed=1)
  hf.save_pretrained(root / "hf")
  saved = load_file(str(root / "hf" / "model.safetensors"))

  hf = hf.double()
  want = {size: _torch_logits(hf, _images(*size)) for size in (*SIZES, EXPORT_SIZE)}
  hf_eps6 = copy.deepcopy(hf)
  _set_block_norm_eps_(hf_eps6, 1e-6)
  want_eps6 = _torch_logits(hf_eps6, _images(*SIZES[0]))

  official = writers.segformer_official_state_dict(saved)
  classes = tuple(f"release_{i}" for i in range(k))
  torch.save({"state_dict": {n: torch.from_numpy(v) for n, v in official.items()},
              "meta": {"CLASSES": classes, "PALETTE": [[i, i, i] for i in range(k)],
                       "mmseg_version": "0.11.0+", "iter": 160000},
              "optimizer": {"state": {0: {"step": torch.tensor(3.0)}},
                            "param_groups": [{"lr": 6e-5, "params": [0]}]}},
             root / "segformer.pth")
  return dict(name=name, fields=fields, labels=labels, classes=classes, root=root, saved=saved,
              official=official, want=want, want_eps6=want_eps6)


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
  """name -> the reference of `_reference` with both files converted by the CLI (bundle_hf,
  bundle_official). The first call runs every reference (torch) before any conversion (JAX):
  on 2 CPU cores, torch calls made after JAX ones ran several times slower here."""
  refs, done = {}, {}

  def get(name: str) -> dict:
    if not refs:
      refs.update({n: _reference(n, tmp_path_factory.mktemp(n)) for n in sorted(CONFIGS)})
    if name not in done:
      ref, root = refs[name], refs[name]["root"]
      assert support.convert_cli(root / "hf", root / "bundle_hf", "--from", "hf-segformer") == 0
      assert support.convert_cli(root / "segformer.pth", root / "bundle_official", "--from",
                                 "segformer-official") == 0
      done[name] = dict(ref, bundle_hf=str(root / "bundle_hf"),
                        bundle_official=str(root / "bundle_official"))
    return done[name]

  return get


@pytest.fixture(params=sorted(CONFIGS))
def conv(request, conversions) -> dict:
  return conversions(request.param)


@pytest.fixture
def b0(conversions) -> dict:
  """The B0 conversion alone, for what one model shows."""
  return conversions("b0")


def test_hf_import_matches_transformers(conv):
  b = bundle.load_bundle(conv["bundle_hf"])
  meta = bundle.read_config(conv["bundle_hf"])
  assert meta["source_format"] == "hf-segformer"
  assert meta["class_names"] == [conv["labels"][i] for i in range(len(conv["labels"]))]
  assert meta["mean"] == [123.675, 116.28, 103.53] and meta["std"] == [58.395, 57.12, 57.375]
  assert meta["num_batches_tracked"] == NUM_BATCHES_TRACKED
  bb = meta["model"]["backbone"]
  assert bb["norm_eps"] == 1e-5 and bb["embed_norm_eps"] == 1e-5
  assert bb.get("variant") == ("B0" if conv["name"] == "b0" else None)
  assert bb["depths"] == list(transformers.SegformerConfig(**conv["fields"]).depths)
  for size in SIZES:
    got = _our_logits(b.model, b.variables, _images(*size))
    want = conv["want"][size]
    diff = support.max_diff(got, want)
    print(f"{conv['name']} {size}: hf import max |logits| {np.abs(want).max():.2f}, "
          f"max abs diff {diff:.1e}")
    assert diff < TOL
  # Measured (CPU, x86, float32 vs float64): b0 2.0e-6 / 2.2e-6, b2_like 2.1e-6 / 2.3e-6
  # (128x128 / 96x160); max |logits| 2.8-3.5.


def test_hf_export_loads_in_transformers(conv, tmp_path):
  out = tmp_path / "hf_again"
  assert support.convert_cli(conv["bundle_hf"], out, "--to", "hf-segformer") == 0
  again = load_file(str(out / "model.safetensors"))
  assert sorted(again) == sorted(conv["saved"])
  unequal = [k for k, v in conv["saved"].items()
             if not np.array_equal(again[k], v) or again[k].dtype != v.dtype]
  assert not unequal, unequal
  assert int(again["decode_head.batch_norm.num_batches_tracked"]) == NUM_BATCHES_TRACKED
  model, info = transformers.SegformerForSemanticSegmentation.from_pretrained(
      str(out), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  assert model.config.id2label == conv["labels"]
  assert model.config.num_labels == conv["fields"]["num_labels"]
  got = _torch_logits(model.double().eval(), _images(*EXPORT_SIZE))
  diff = support.max_diff(got, conv["want"][EXPORT_SIZE])
  assert diff == 0.0, diff  # bitwise the same weights, the same (deterministic) torch ops
  processor = json.loads((out / "preprocessor_config.json").read_text())
  np.testing.assert_allclose(np.array(processor["image_mean"]) * 255, [123.675, 116.28, 103.53])


def test_official_import_and_layer_norm_eps(conv):
  meta = bundle.read_config(conv["bundle_official"])
  assert meta["source_format"] == "segformer-official"
  assert tuple(meta["class_names"]) == conv["classes"]  # from the file's meta CLASSES
  assert meta["model"]["backbone"]["norm_eps"] == 1e-6
  assert meta["num_batches_tracked"] == NUM_BATCHES_TRACKED
  b = bundle.load_bundle(conv["bundle_official"])
  _assert_bitwise(b.variables, _variables(conv["bundle_hf"]), "official vs hf import")
  images = _images(*SIZES[0])
  got = _our_logits(b.model, b.variables, images)  # as recorded: eps 1e-6
  got_eps5 = _our_logits(_with_eps(b.config.model, 1e-5), b.variables, images)
  want, want_eps6 = conv["want"][SIZES[0]], conv["want_eps6"]
  exact_eps6, exact_eps5 = support.max_diff(got, want_eps6), support.max_diff(got_eps5, want)
  eps_effect = support.max_diff(want_eps6, want)  # float64 transformers, eps 1e-6 vs 1e-5
  ours_vs_hf = support.max_diff(got, want)
  print(f"{conv['name']} {SIZES[0]}: official import (eps 1e-6) vs transformers at eps 1e-6 "
        f"{exact_eps6:.1e}; at eps 1e-5 vs transformers {exact_eps5:.1e}; the eps alone "
        f"(float64) {eps_effect:.1e}; the bundle (1e-6) vs transformers (1e-5) {ours_vs_hf:.1e}")
  assert exact_eps6 < TOL and exact_eps5 < TOL
  assert 0 < eps_effect < 3e-5 and ours_vs_hf < TOL
  # Measured (CPU, x86; 128x128, max |logits| 3.1 / 3.5): at matching eps b0 2.0e-6 (1e-6)
  # and 2.0e-6 (1e-5), b2_like 2.2e-6 and 2.1e-6; the eps alone (float64) b0 7.4e-6, b2_like
  # 8.7e-6; the bundle as recorded vs transformers as is: b0 7.7e-6, b2_like 9.4e-6.


def test_round_trips_are_exact(conv, tmp_path):
  """bundle -> official -> bundle, bundle -> HF -> bundle, and across (HF bundle -> official
  -> bundle): parameters and BatchNorm statistics bitwise; the re-exported release file has
  every key of the original (what load_state_dict(strict=True) asks) and equals it, the step
  counter included, but for mmseg's unused conv_seg: zeros of the release's shape."""
  official, hf_bundle = conv["bundle_official"], conv["bundle_hf"]
  pth = tmp_path / "again.pth"
  assert support.convert_cli(official, pth, "--to", "segformer-official") == 0
  assert support.convert_cli(pth, tmp_path / "b1", "--from", "segformer-official") == 0
  _assert_bitwise(_variables(official), _variables(str(tmp_path / "b1")), "official")
  first, second = bundle.read_config(official), bundle.read_config(str(tmp_path / "b1"))
  assert second["model"] == first["model"] and second["class_names"] == first["class_names"]
  obj = torch.load(pth, map_location="cpu", weights_only=True)
  assert sorted(obj) == ["meta", "state_dict"]
  assert obj["meta"]["CLASSES"] == conv["classes"]
  assert len(obj["meta"]["PALETTE"]) == len(conv["classes"])
  exported = {k: v.numpy() for k, v in obj["state_dict"].items()}
  assert sorted(exported) == sorted(conv["official"])
  # BaseDecodeHead's Conv2d(channels, num_classes, 1), channels 128 in every release config
  # (the test's release file gives it linear_pred's shape instead).
  k = len(conv["classes"])
  conv_seg = [exported.pop(f"decode_head.conv_seg.{n}") for n in ("weight", "bias")]
  assert [c.shape for c in conv_seg] == [(k, 128, 1, 1), (k,)]
  assert all(c.dtype == np.float32 and not c.any() for c in conv_seg)
  written = {k: v for k, v in conv["official"].items() if not k.startswith("decode_head.conv_seg.")}
  unequal = [k for k, v in written.items()
             if not np.array_equal(exported[k], v) or exported[k].dtype != v.dtype]
  assert not unequal, unequal

  assert support.convert_cli(hf_bundle, tmp_path / "hf", "--to", "hf-segformer") == 0
  assert support.convert_cli(tmp_path / "hf", tmp_path / "b2", "--from", "hf-segformer") == 0
  _assert_bitwise(_variables(hf_bundle), _variables(str(tmp_path / "b2")), "hf")
  assert bundle.read_config(str(tmp_path / "b2"))["model"] == bundle.read_config(
      hf_bundle)["model"]

  assert support.convert_cli(hf_bundle, tmp_path / "cross.pth", "--to", "segformer-official") == 0
  assert support.convert_cli(tmp_path / "cross.pth", tmp_path / "b3", "--from",
                             "segformer-official") == 0
  _assert_bitwise(_variables(hf_bundle), _variables(str(tmp_path / "b3")), "hf -> official")
  cross = bundle.read_config(str(tmp_path / "b3"))
  assert cross["mean"] == bundle.read_config(hf_bundle)["mean"]  # from the export's meta
  model = copy.deepcopy(bundle.read_config(hf_bundle)["model"])
  model["backbone"]["norm_eps"] = 1e-6  # the layout's eps: the only change
  assert cross["model"] == model


def test_official_table_is_one_to_one():
  """Every rule maps back to itself, on shapes that tell packed parts apart."""
  rng = np.random.default_rng(0)
  tables = {**segformer.RULES, **{f"{k} encoder": v for k, v in segformer.ENCODER_RULES.items()}}
  for fmt, table in tables.items():
    layout = fmt.split()[0]
    for rule in table:
      fields = {"s": 3, "j": 2}
      key = rules.format_key(rule.theirs, fields)
      assert rules.parse_key(rule.theirs, key) == {
          f: v for f, v in fields.items() if "{" + f in rule.theirs}, (fmt, key)
      shape = (12, 4, 3, 3) if rule.to_ours is rules.from_torch_conv else (
          (12, 4) if key.endswith("weight") else (12,))
      x = rng.standard_normal(shape).astype(np.float32)
      ours = rules.to_ours({key: x}, table, source=fmt, layout=layout)
      back = rules.to_theirs(ours, table, source=fmt, layout=layout)
      assert list(back) == [key] and np.array_equal(back[key], x), (fmt, key)
  # transformers' stage 0 is the release's stage 1 and ours.
  ours = rules.to_ours({"decode_head.linear_c.0.proj.bias": np.zeros(3)},
                       segformer.RULES["hf-segformer"], source="t", layout="hf-segformer")
  assert list(ours) == ["params/head/linear_c_1/bias"]


# ----------------------------------------------------------------------------------------------
# --config, errors


def test_config_gives_names_and_statistics_and_must_agree(b0, config_file, tmp_path, capsys):
  """The config describes the B0."""
  conv = b0
  src = conv["root"] / "segformer.pth"
  assert support.convert_cli(src, tmp_path / "b", "--from", "segformer-official", "--config",
                             config_file) == 0
  meta = bundle.read_config(str(tmp_path / "b"))
  assert tuple(meta["class_names"]) == cityscapes.CITYSCAPES_CLASSES
  assert meta["mean"] == [120.0, 110.0, 100.0] and meta["std"] == [50.0, 51.0, 52.0]
  assert meta["model"]["backbone"] == {"variant": "B0", "norm_eps": 1e-6,
                                       "embed_norm_eps": 1e-5}
  # The config's test protocol, whole (the skeleton's: slide 512 / 341); none without --config.
  config = config_utils.load_config(config_file)
  assert meta["eval"] == json.loads(json.dumps(config.eval.to_dict()))
  assert (meta["eval"]["mode"], meta["eval"]["crop_size"], meta["eval"]["stride"]) == (
      "slide", [512, 512], [341, 341])
  assert "eval" not in bundle.read_config(conv["bundle_official"])
  _assert_bitwise(_variables(str(tmp_path / "b")), _variables(conv["bundle_official"]), "cfg")

  capsys.readouterr()
  assert support.convert_cli(conv["root"] / "hf", tmp_path / "c", "--from", "hf-segformer",
                             "--config", f"{config_file}:deeper") == 1
  err = capsys.readouterr().err
  assert "does not hold the model the config describes" in err
  assert "backbone.depths: config (2, 2, 3, 2), file (2, 2, 2, 2)" in err


def test_errors_name_the_cause(b0, tmp_path, capsys):
  conv = b0

  def error(*args) -> str:
    capsys.readouterr()
    assert support.convert_cli(*args) == 1
    return capsys.readouterr().err

  mit = tmp_path / "mit_b0.pth"
  torch.save({k: torch.from_numpy(v) for k, v in writers.segformer_official_state_dict(
      conv["saved"], encoder_only=True).items()}, mit)
  err = error(mit, tmp_path / "x", "--from", "segformer-official")
  assert "holds an ImageNet MiT encoder" in err and "model_init_format='segformer-official'" in err

  vit = tmp_path / "vit.pth"
  torch.save({"cls_token": torch.zeros(1, 1, 8), "blocks.0.norm1.weight": torch.ones(8)}, vit)
  err = error(vit, tmp_path / "x", "--from", "segformer-official")
  assert "is not a SegFormer / MiT checkpoint" in err and "blocks.0.norm1.weight" in err

  extra = dict(conv["official"], **{"backbone.block1.0.attn.extra.weight": np.zeros(2)})
  torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in extra.items()}},
             tmp_path / "extra.pth")
  err = error(tmp_path / "extra.pth", tmp_path / "x", "--from", "segformer-official")
  assert "1 tensor(s) the segformer-official layout of this model does not have: " \
         "backbone.block1.0.attn.extra.weight" in err

  err = error(conv["bundle_hf"], tmp_path / "x", "--to", "segvit-official")
  assert "'segformer' bundle" in err


# ----------------------------------------------------------------------------------------------
# config.model_init


def _fresh(model_cfg) -> dict:
  """Random stand-ins for a model's freshly initialised parameters (model.init compiles for
  longer than these tests run)."""
  model = build_model(model_cfg)
  abstract = flax.linen.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))))
  rng = np.random.default_rng(7)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                      abstract["params"])


B0_SEGFORMER = {"name": "segformer", "num_classes": 5, "backbone": {"variant": "B0"},
                "head": {"width": 32}}
B0_SEGVIT = {"name": "segvit", "num_classes": 5,
             "backbone": {"type": "mit", "variant": "B0"},
             "head": {"tap_layers": (1, 2, 3), "width": 32, "num_heads": 2,
                      "layers_per_stage": 1}}


def test_mit_encoder_as_model_init(b0, tmp_path):
  """A mit_b0.pth (and the HF directory, a whole release file, and a bundle of a SegFormer of
  other classes) as config.model_init of a SegFormer and of a SegViT on MiT: the backbone is
  the file's, the head its own."""
  conv = b0
  mit = tmp_path / "mit_b0.pth"
  torch.save({k: torch.from_numpy(v) for k, v in writers.segformer_official_state_dict(
      conv["saved"], encoder_only=True).items()}, mit)
  # transformers' encoder directories: SegformerModel (`encoder.*`) and
  # SegformerForImageClassification (`segformer.encoder.*` + `classifier.*`), as saved.
  hf_config = json.loads((conv["root"] / "hf" / "config.json").read_text())
  encoder = {k.removeprefix("segformer."): v for k, v in conv["saved"].items()
             if k.startswith("segformer.")}
  classifier = {**{"segformer." + k: v for k, v in encoder.items()},
                "classifier.weight": np.ones((1000, 256), np.float32),
                "classifier.bias": np.zeros(1000, np.float32)}
  dirs = []
  for name, tensors, arch in (("hf_model", encoder, "SegformerModel"),
                              ("hf_cls", classifier, "SegformerForImageClassification")):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(dict(hf_config,
                                                                 architectures=[arch])))
    writers.save_safetensors(tmp_path / name / "model.safetensors", tensors)
    dirs.append((tmp_path / name, "hf-segformer"))
  want = bundle.load_params(conv["bundle_official"])["backbone"]
  for model_cfg in (B0_SEGFORMER, B0_SEGVIT):
    init = _fresh(model_cfg)
    for path, fmt in ((mit, "segformer-official"), (conv["root"] / "hf", "hf-segformer"),
                      *dirs, (conv["root"] / "segformer.pth", "segformer-official"),
                      (conv["bundle_hf"], "bundle")):
      got = convert.init_params(init, model_cfg, str(path), fmt)
      _assert_bitwise(got["backbone"], want, f"{model_cfg['name']} from {fmt}")
      _assert_bitwise({k: v for k, v in got.items() if k != "backbone"},
                      {k: v for k, v in init.items() if k != "backbone"}, "head stays fresh")


def test_model_init_of_another_model_names_keys(b0, tmp_path):
  conv = b0
  mit = tmp_path / "mit_b0.pth"
  torch.save({k: torch.from_numpy(v) for k, v in writers.segformer_official_state_dict(
      conv["saved"], encoder_only=True).items()}, mit)
  deeper = copy.deepcopy(B0_SEGFORMER)
  deeper["backbone"] = {"dims": (32, 64, 160, 256), "depths": (2, 2, 3, 2)}
  with pytest.raises(ValueError) as e:
    convert.init_params(_fresh(deeper), deeper, str(mit), "segformer-official")
  assert f"parameters from {mit} (segformer-official) do not match the model" in str(e.value)
  assert "missing (" in str(e.value) and "block_3_2/attn/key/bias" in str(e.value)
  wider = copy.deepcopy(B0_SEGFORMER)
  wider["backbone"] = {"variant": "B1"}
  with pytest.raises(ValueError, match=r"mis-shaped \(192\): .*block_1_0/attn/key/kernel: "
                                       r"expected \(64, 64\), got \(32, 32\)"):
    convert.init_params(_fresh(wider), wider, str(mit), "segformer-official")
  with pytest.raises(ValueError, match="model_init_format 'timm' reads ViT weights; an MiT "
                                       "backbone starts from segformer-official, hf-segformer"):
    convert.init_params(_fresh(B0_SEGFORMER), B0_SEGFORMER, str(mit), "timm")


# ----------------------------------------------------------------------------------------------
# predict.py


def test_predict_runs_on_a_converted_bundle(b0, tmp_path):
  conv = b0
  images, out = tmp_path / "images", tmp_path / "out"
  images.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (64, 80, 3), np.uint8)).save(images / "a.png")
  Image.fromarray(rng.integers(0, 256, (70, 50, 3), np.uint8)).save(images / "b.jpg")
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), "--checkpoint",
                         conv["bundle_hf"], "--input", str(images), "--output", str(out),
                         "--save-scores"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name, (h, w) in (("a", (64, 80)), ("b", (70, 50))):
    assert (out / f"{name}_overlay.jpg").is_file()
    pred = np.asarray(Image.open(out / f"{name}.png"))
    scores = np.load(out / f"{name}.npy")
    assert pred.shape == (h, w) and scores.shape == (19, h, w)
    np.testing.assert_array_equal(pred, scores.argmax(0))
