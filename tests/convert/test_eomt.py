"""EoMT checkpoints both ways (segvit_jax/convert/eomt.py) against transformers'
EomtForUniversalSegmentation.

References: small randomly initialised transformers models (an MLP and a SwiGLU FFN, as EoMT-g),
every parameter perturbed, `attn_mask_probs` 0 (a fully annealed model), eager attention,
saved with `save_pretrained` in float32 and run in float64. The release's layout is written
from the saved state dict by tests/checkpoint_writers.py (`eomt_official_state_dict`, an
independent key mapping: q / k / v packed, timm's cls-less `pos_embed`, `reg_token`, the
mask-head Sequential indices 0 / 2 / 4, SwiGLU packed [gate; value], the 0-1 pixel buffers) and
saved as a Lightning checkpoint (`state_dict`, `epoch`, `optimizer_states`, ...).

- `--from hf-eomt`: our class and mask logits equal transformers' in eval.
- `--to hf-eomt`: `from_pretrained` loads the directory with no missing or unexpected keys, the
  saved tensors are bitwise the original's (buffers included) and the outputs the reference's.
- `--from eomt-official`: the same parameters bitwise as the HF import; the pixel statistics
  from the file's buffers; L2 from its `attn_mask_probs`.
- Round trips bundle -> official -> bundle and bundle -> HF -> bundle are bitwise, across
  layouts too; the re-exported release file equals the written one.
- transformers 4.x's packed SwiGLU names (`weights_in` / `weights_out`) are read too.
- Errors name the cause: other models' files, a --config of another model, missing heads.
- `Bundle.predict` on uint8 images equals transformers' image processor + model +
  `post_process_semantic_segmentation` (the PIL image processor: no torchvision here).
"""

from __future__ import annotations

import json
import shutil

import flax
import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from transformers.models.eomt.image_processing_pil_eomt import EomtImageProcessorPil

from segvit_jax import bundle, config_utils
from segvit_jax.data import synthetic

from tests import checkpoint_writers as writers
from tests import support

TOL = 1e-4  # float32 Flax ("highest" matmul precision) vs float64 torch
HIDDEN, DEPTH, HEADS, NUM_BLOCKS, QUERIES, LABELS, IMAGE, PATCH, REGISTERS = (
    64, 5, 4, 2, 10, 6, 96, 16, 4)
GRID = IMAGE // PATCH
FFNS = ("mlp", "swiglu")
SWIGLU_HIDDEN = 176  # transformers' (int(4 * 64 * 2 / 3) + 7) // 8 * 8
IMAGENET = [[123.675, 116.28, 103.53], [58.395, 57.12, 57.375]]

# What a user passes with --config: the small model (width 64 is no standard DINOv2 width, so
# the release's files do not tell its heads), the synthetic dataset's six class names.
# ":swiglu" is the SwiGLU model; ":l2_3" describes another model (three query blocks).
CONFIG_FILE = '''
import ml_collections

from configs import common


def get_config(arg=""):
  c = common.run_config()
  c.dataset.update(name="synthetic", num_classes=6)
  swiglu = arg == "swiglu"
  c.model = ml_collections.ConfigDict(dict(
      name="eomt", num_classes=6, num_queries=10, num_blocks=3 if arg == "l2_3" else 2,
      backbone=dict(width=64, depth=5, num_heads=4, mlp_dim=176 if swiglu else 256,
                    ffn="swiglu" if swiglu else "mlp", patch_size=16, posemb_grid=(6, 6),
                    num_registers=4, layerscale=1.0, posemb_resize="bicubic_antialias")))
  c.mean, c.std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
  return c
'''


def _randomize_(model: torch.nn.Module, seed: int) -> None:
  """Every parameter random: fan-in-scaled weights, norm scales around 1, LayerScale around
  0.5, biases, tokens, queries and positions around 0."""
  g = torch.Generator().manual_seed(seed)
  randn = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype)  # noqa: E731
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("lambda1"):
        p.copy_(0.5 + 0.1 * randn(p))
      elif name.endswith(("cls_token", "register_tokens", "position_embeddings.weight",
                          "query.weight")):
        p.copy_(randn(p))
      elif p.ndim > 1:
        p.copy_(randn(p) / np.sqrt(np.prod(p.shape[1:])))
      elif name.endswith("weight"):
        p.copy_(1.0 + 0.2 * randn(p))
      else:
        p.copy_(0.2 * randn(p))
    model.attn_mask_probs.zero_()  # fully annealed: unmasked in eval


def _uint8_image(seed: int = 5) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (1, IMAGE, IMAGE, 3), np.uint8)


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _assert_bitwise(first: dict, second: dict, what: str) -> None:
  f1, f2 = _flat(first), _flat(second)
  assert sorted(f1) == sorted(f2), what
  unequal = [k for k in f1 if not np.array_equal(f1[k], f2[k]) or f1[k].dtype != f2[k].dtype]
  assert not unequal, (what, unequal)


def _save_lightning(path, state: dict[str, np.ndarray]) -> None:
  """As Lightning saves a checkpoint: the module's state dict beside the trainer's state."""
  torch.save({"epoch": 30, "global_step": 39120, "pytorch-lightning_version": "2.5.1",
              "state_dict": {k: torch.from_numpy(np.ascontiguousarray(v))
                             for k, v in state.items()},
              "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 30}}}},
              "callbacks": {}, "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0),
                                                                   "exp_avg": torch.zeros(4)}},
                                                     "param_groups": [{"lr": 1e-4,
                                                                       "params": [0]}]}],
              "lr_schedulers": [{"last_epoch": 39120}], "hparams_name": "kwargs",
              "hyper_parameters": {"img_size": [IMAGE, IMAGE], "num_classes": LABELS}}, path)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("configs") / "eomt_tiny.py"
  path.write_text(CONFIG_FILE)
  return str(path)


def _reference(ffn: str, root) -> dict:
  """One reference model: its save_pretrained directory, the release's checkpoint written from
  it, its float64 outputs on normalised images and its semantic post-processing of a uint8
  image through transformers' image processor."""
  labels = {i: f"thing_{i}" for i in range(LABELS)}
  config = transformers.EomtConfig(
      hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
      num_blocks=NUM_BLOCKS, num_queries=QUERIES, num_labels=LABELS, image_size=IMAGE,
      patch_size=PATCH, num_register_tokens=REGISTERS, use_swiglu_ffn=ffn == "swiglu",
      id2label=labels, label2id={v: k for k, v in labels.items()})
  config._attn_implementation = "eager"  # the plain softmax(q k^T) v
  torch.manual_seed(0)
  hf = transformers.EomtForUniversalSegmentation(config).eval()
  _randomize_(hf, seed=1)
  hf.save_pretrained(root / "hf")
  saved = load_file(str(root / "hf" / "model.safetensors"))
  official = writers.eomt_official_state_dict(saved)
  _save_lightning(root / "eomt.ckpt", official)

  hf = hf.double()
  want = support.hf_eomt_outputs(hf, support.normal_images(IMAGE))
  processor = EomtImageProcessorPil(do_resize=False, do_split_image=False, do_pad=False,
                                    size={"shortest_edge": IMAGE, "longest_edge": IMAGE})
  pixels = processor(images=list(_uint8_image()), return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    out = hf(pixel_values=pixels.double())
  post = processor.post_process_semantic_segmentation(out, target_sizes=[(IMAGE, IMAGE)],
                                                      return_segmentation_scores=True)
  return dict(ffn=ffn, root=root, labels=labels, saved=saved, official=official, want=want,
              want_scores=post[0].segmentation_scores.numpy(),
              want_segmentation=post[0].segmentation.numpy())


@pytest.fixture(scope="module")
def conversions(tmp_path_factory, config_file):
  """ffn -> the reference of `_reference` with both files converted by the CLI (bundle_hf
  without --config; bundle_official with it: the release does not record width 64's heads).
  Every reference (torch) runs before any conversion (JAX): on 2 CPU cores, torch calls made
  after JAX ones ran several times slower here."""
  refs, done = {}, {}

  def get(ffn: str) -> dict:
    if not refs:
      refs.update({f: _reference(f, tmp_path_factory.mktemp(f)) for f in FFNS})
    if ffn not in done:
      ref, root = refs[ffn], refs[ffn]["root"]
      cfg = f"{config_file}:swiglu" if ffn == "swiglu" else config_file
      assert support.convert_cli(root / "hf", root / "bundle_hf", "--from", "hf-eomt") == 0
      assert support.convert_cli(root / "eomt.ckpt", root / "bundle_official", "--from",
                                 "eomt-official", "--config", cfg) == 0
      done[ffn] = dict(ref, config=cfg, bundle_hf=str(root / "bundle_hf"),
                       bundle_official=str(root / "bundle_official"))
    return done[ffn]

  return get


@pytest.fixture(params=FFNS)
def conv(request, conversions) -> dict:
  return conversions(request.param)


@pytest.fixture
def mlp(conversions) -> dict:
  return conversions("mlp")


def test_hf_import_matches_transformers(conv):
  meta = bundle.read_config(conv["bundle_hf"])
  assert meta["source_format"] == "hf-eomt"
  assert meta["class_names"] == [conv["labels"][i] for i in range(LABELS)]
  assert [meta["mean"], meta["std"]] == IMAGENET  # no preprocessor_config.json: ImageNet's
  model = meta["model"]
  assert (model["name"], model["num_classes"], model["num_queries"], model["num_blocks"]) == (
      "eomt", LABELS, QUERIES, NUM_BLOCKS)
  bb = model["backbone"]
  assert bb["posemb_grid"] == [GRID, GRID] and bb["posemb_resize"] == "bicubic"
  assert (bb["width"], bb["depth"], bb["num_heads"], bb["num_registers"]) == (
      HIDDEN, DEPTH, HEADS, REGISTERS)
  assert (bb["ffn"], bb["mlp_dim"]) == (("swiglu", SWIGLU_HIDDEN) if conv["ffn"] == "swiglu"
                                        else ("mlp", 4 * HIDDEN))
  assert bb["norm_eps"] == 1e-6 and bb["layerscale"] == 1.0
  b = bundle.load_bundle(conv["bundle_hf"])
  masks, classes = support.eomt_outputs(b, support.normal_images(IMAGE))
  want_masks, want_classes = conv["want"]
  assert masks.shape == (2, QUERIES, IMAGE // 4, IMAGE // 4)
  dm, dc = support.max_diff(masks, want_masks), support.max_diff(classes, want_classes)
  print(f"{conv['ffn']}: hf import, max |mask logit| {np.abs(want_masks).max():.1f} diff "
        f"{dm:.1e}; max |class logit| {np.abs(want_classes).max():.1f} diff {dc:.1e}")
  assert dm < TOL and dc < TOL
  # Measured (CPU, x86, float32 vs float64): mlp masks 9.3e-6 (max |logit| 16.9), classes
  # 6.6e-7 (2.4); swiglu masks 8.6e-6 (15.5), classes 6.2e-7 (2.5).


def test_hf_export_loads_in_transformers(conv, tmp_path):
  out = tmp_path / "hf_again"
  assert support.convert_cli(conv["bundle_hf"], out, "--to", "hf-eomt") == 0
  again = load_file(str(out / "model.safetensors"))
  assert sorted(again) == sorted(conv["saved"])
  # Bitwise, the buffers included: attn_mask_probs zeros, the loss's class weights.
  unequal = [k for k, v in conv["saved"].items()
             if not np.array_equal(again[k], v) or again[k].dtype != v.dtype]
  assert not unequal, unequal
  model, info = transformers.EomtForUniversalSegmentation.from_pretrained(
      str(out), output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  assert model.config.id2label == conv["labels"]
  assert (model.config.num_blocks, model.config.use_swiglu_ffn) == (NUM_BLOCKS,
                                                                   conv["ffn"] == "swiglu")
  masks, classes = support.hf_eomt_outputs(model.double().eval(), support.normal_images(IMAGE))
  diff = max(support.max_diff(masks, conv["want"][0]), support.max_diff(classes, conv["want"][1]))
  print(f"{conv['ffn']}: hf export reloaded, max abs diff {diff:.1e}")
  assert diff <= 1e-6  # measured 0: bitwise the same weights, the same torch ops
  processor = EomtImageProcessorPil.from_pretrained(str(out))
  np.testing.assert_allclose(np.array(processor.image_mean) * 255, IMAGENET[0])
  assert processor.size.shortest_edge == IMAGE and processor.do_split_image


def test_official_import(conv):
  """The release's file gives the HF import's parameters bitwise; the pixel statistics come
  from its 0-1 buffers, L2 from attn_mask_probs, class names from --config."""
  meta = bundle.read_config(conv["bundle_official"])
  assert meta["source_format"] == "eomt-official"
  assert tuple(meta["class_names"]) == synthetic.CLASS_NAMES
  assert [meta["mean"], meta["std"]] == IMAGENET
  assert meta["model"]["backbone"]["posemb_resize"] == "bicubic_antialias"
  assert meta["model"]["backbone"]["posemb_grid"] == [GRID, GRID]
  assert meta["model"]["num_blocks"] == NUM_BLOCKS
  # The config's test protocol, whole (the skeleton's); none without --config (the HF import).
  config = config_utils.load_config(conv["config"])
  assert meta["eval"] == json.loads(json.dumps(config.eval.to_dict()))
  assert (meta["eval"]["mode"], meta["eval"]["crop_size"], meta["eval"]["scales"]) == (
      "slide", [512, 512], [1.0])
  assert "eval" not in bundle.read_config(conv["bundle_hf"])
  _assert_bitwise(bundle.load_params(conv["bundle_official"]),
                  bundle.load_params(conv["bundle_hf"]), "official vs hf import")
  b = bundle.load_bundle(conv["bundle_official"])
  masks, classes = support.eomt_outputs(b, support.normal_images(IMAGE))
  diff = max(support.max_diff(masks, conv["want"][0]), support.max_diff(classes, conv["want"][1]))
  print(f"{conv['ffn']}: official import vs transformers, max abs diff {diff:.1e}")
  assert diff < TOL  # measured: as the HF import (same parameters, at the stored grid)


def test_round_trips_are_exact(conv, tmp_path):
  """bundle -> official -> bundle, bundle -> HF -> bundle, and across (official bundle -> HF ->
  bundle): parameters bitwise; the model configs equal (across layouts: but for the recorded
  position-resize method); the re-exported release file equals the written one. The export
  records our model config, so its re-import needs no --config."""
  official, hf_bundle = conv["bundle_official"], conv["bundle_hf"]
  ckpt = tmp_path / "again.ckpt"
  assert support.convert_cli(official, ckpt, "--to", "eomt-official") == 0
  obj = torch.load(ckpt, map_location="cpu", weights_only=True)
  assert sorted(obj) == ["meta", "state_dict"]
  exported = {k: v.numpy() for k, v in obj["state_dict"].items()}
  assert sorted(exported) == sorted(conv["official"])
  unequal = [k for k, v in conv["official"].items()
             if not np.array_equal(exported[k], v) or exported[k].dtype != v.dtype]
  assert not unequal, unequal
  assert support.convert_cli(ckpt, tmp_path / "b1", "--from", "eomt-official") == 0
  _assert_bitwise(bundle.load_params(official), bundle.load_params(str(tmp_path / "b1")),
                  "official")
  first, second = bundle.read_config(official), bundle.read_config(str(tmp_path / "b1"))
  for key in ("class_names", "mean", "std"):
    assert second[key] == first[key], key
  assert second["model"] == first["model"]

  assert support.convert_cli(hf_bundle, tmp_path / "hf", "--to", "hf-eomt") == 0
  assert support.convert_cli(tmp_path / "hf", tmp_path / "b2", "--from", "hf-eomt") == 0
  _assert_bitwise(bundle.load_params(hf_bundle), bundle.load_params(str(tmp_path / "b2")), "hf")
  assert bundle.read_config(str(tmp_path / "b2"))["model"] == bundle.read_config(
      hf_bundle)["model"]

  assert support.convert_cli(official, tmp_path / "cross", "--to", "hf-eomt") == 0
  assert support.convert_cli(tmp_path / "cross", tmp_path / "b3", "--from", "hf-eomt") == 0
  _assert_bitwise(bundle.load_params(official), bundle.load_params(str(tmp_path / "b3")),
                  "official -> hf")
  cross = bundle.read_config(str(tmp_path / "b3"))
  assert cross["class_names"] == first["class_names"]  # id2label of the export
  assert cross["mean"] == first["mean"]  # its preprocessor_config.json
  assert cross["model"]["backbone"]["posemb_resize"] == "bicubic"  # transformers' fixed grid


def test_bare_network_state_dict_and_packed_swiglu(conversions, tmp_path):
  """The network's own state dict (no `network.` prefix, no loss buffer) is a release file
  too; transformers 4.x's SwiGLU names give the same bundle as 5.x's."""
  ref = conversions("swiglu")
  bare = {k[len("network."):]: v for k, v in ref["official"].items() if k.startswith("network.")}
  writers.save_torch(tmp_path / "network.pth", bare)
  assert support.convert_cli(tmp_path / "network.pth", tmp_path / "b1", "--from", "eomt-official",
                             "--config", ref["config"]) == 0
  _assert_bitwise(bundle.load_params(str(tmp_path / "b1")),
                  bundle.load_params(ref["bundle_official"]), "bare network")

  legacy = tmp_path / "hf_4x"
  legacy.mkdir()
  shutil.copy(ref["root"] / "hf" / "config.json", legacy / "config.json")
  packed = writers.hf_eomt_packed_swiglu(ref["saved"])
  assert "layers.0.mlp.weights_in.weight" in packed and not any("gate_proj" in k for k in packed)
  writers.save_safetensors(legacy / "model.safetensors", packed)
  assert support.convert_cli(legacy, tmp_path / "b2", "--from", "hf-eomt") == 0
  _assert_bitwise(bundle.load_params(str(tmp_path / "b2")),
                  bundle.load_params(ref["bundle_hf"]), "weights_in / weights_out")


# ----------------------------------------------------------------------------------------------
# --config, errors


def test_config_must_agree(mlp, config_file, tmp_path, capsys):
  def error(*args) -> str:
    capsys.readouterr()
    assert support.convert_cli(*args) == 1
    return capsys.readouterr().err

  ckpt = mlp["root"] / "eomt.ckpt"
  err = error(ckpt, tmp_path / "x", "--from", "eomt-official", "--config", f"{config_file}:l2_3")
  assert "does not hold the model the config describes: num_blocks: config 3, file 2 " \
         "(network.attn_mask_probs has 2 entries)" in err
  err = error(mlp["root"] / "hf", tmp_path / "x", "--from", "hf-eomt", "--config",
              f"{config_file}:swiglu")
  assert "backbone.mlp_dim: config 176, file 256; backbone.ffn: config swiglu, file mlp" in err
  # Without --config the release's file does not tell width 64's heads.
  err = error(ckpt, tmp_path / "x", "--from", "eomt-official")
  assert "does not record the attention heads and its width 64 is not a standard DINOv2 " \
         "width" in err and "--config" in err
  # Without its attn_mask_probs buffer L2 comes from the config.
  state = {k: v for k, v in mlp["official"].items() if k != "network.attn_mask_probs"}
  _save_lightning(tmp_path / "no_probs.ckpt", state)
  assert support.convert_cli(tmp_path / "no_probs.ckpt", tmp_path / "b", "--from", "eomt-official",
                             "--config", config_file) == 0
  assert bundle.read_config(str(tmp_path / "b"))["model"]["num_blocks"] == NUM_BLOCKS


def test_not_annealed_checkpoint_is_warned_about(mlp, config_file, tmp_path, caplog):
  """A checkpoint saved mid-training (masking probabilities > 0) converts, with a warning:
  its source still masks some queries at inference, the bundle does not."""
  state = dict(mlp["official"], **{"network.attn_mask_probs": np.array([1.0, 0.25],
                                                                       np.float32)})
  _save_lightning(tmp_path / "mid.ckpt", state)
  with caplog.at_level("WARNING"):
    assert support.convert_cli(tmp_path / "mid.ckpt", tmp_path / "b", "--from", "eomt-official",
                               "--config", config_file) == 0
  assert "network.attn_mask_probs = [1.0, 0.25]: saved before masked attention was annealed " \
         "away" in caplog.text
  _assert_bitwise(bundle.load_params(str(tmp_path / "b")),
                  bundle.load_params(mlp["bundle_official"]), "mid-training file")


def test_errors_name_the_cause(mlp, tmp_path, capsys):
  def error(*args) -> str:
    capsys.readouterr()
    assert support.convert_cli(*args) == 1
    return capsys.readouterr().err

  segformer = {"backbone.patch_embed1.proj.weight": torch.zeros(32, 3, 7, 7),
               "backbone.block1.0.attn.q.weight": torch.zeros(32, 32),
               "decode_head.linear_pred.weight": torch.zeros(19, 256, 1, 1)}
  torch.save({"state_dict": segformer, "meta": {"CLASSES": ("a",)}}, tmp_path / "segformer.pth")
  err = error(tmp_path / "segformer.pth", tmp_path / "x", "--from", "eomt-official")
  assert "is not an EoMT checkpoint of the official release: no " \
         "network.encoder.backbone.patch_embed.proj.weight or " \
         "network.encoder.backbone.patch_embed.patch_embeddings.weight (it looks like a " \
         "SegFormer checkpoint (--from segformer-official))" in err
  assert "backbone.block1.0.attn.q.weight" in err and "decode_head.linear_pred.weight" in err

  segvit = {"backbone.cls_token": torch.zeros(1, 1, 8), "backbone.layers.0.ln1.weight":
            torch.ones(8), "decode_head.q.weight": torch.zeros(150, 8)}
  torch.save({"state_dict": segvit}, tmp_path / "segvit.pth")
  err = error(tmp_path / "segvit.pth", tmp_path / "x", "--from", "eomt-official")
  assert "(it looks like a SegViT checkpoint (--from segvit-official))" in err
  assert "backbone.layers.0.ln1.weight" in err

  extra = dict(mlp["official"], **{"network.encoder.backbone.blocks.0.attn.extra.weight":
                                   np.zeros(2, np.float32)})
  _save_lightning(tmp_path / "extra.ckpt", extra)
  err = error(tmp_path / "extra.ckpt", tmp_path / "x", "--from", "eomt-official")
  assert "1 tensor(s) the eomt-official layout of this model does not have: " \
         "network.encoder.backbone.blocks.0.attn.extra.weight" in err

  other = tmp_path / "segformer_dir"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"model_type": "segformer"}))
  writers.save_safetensors(other / "model.safetensors", {"x": np.zeros(1, np.float32)})
  err = error(other, tmp_path / "x", "--from", "hf-eomt")
  assert "model_type='segformer'; --from hf-eomt reads EoMT directories" in err

  not_eomt = tmp_path / "segformer_bundle"
  not_eomt.mkdir()
  (not_eomt / "config.json").write_text(json.dumps({"format": "segvit_jax.bundle",
                                                    "model": {"name": "segformer"}}))
  err = error(not_eomt, tmp_path / "x", "--to", "hf-eomt")
  assert "is a 'segformer' bundle; --to hf-eomt writes whole EoMT models" in err


# ----------------------------------------------------------------------------------------------
# Bundle.predict


def test_predict_matches_transformers_post_processing(mlp):
  """uint8 image at the model's size: our bundle's per-class scores equal transformers' image
  processor (rescale, ImageNet normalisation) + model + post_process_semantic_segmentation."""
  b = bundle.load_bundle(mlp["bundle_hf"])
  with jax.default_matmul_precision("highest"):
    scores = b.predict(_uint8_image())
  want = mlp["want_scores"]
  assert scores.shape == (1, *want.shape) == (1, LABELS, IMAGE, IMAGE)
  diff = support.max_diff(scores[0], want)
  agree = float(np.mean(scores[0].argmax(0) == mlp["want_segmentation"]))
  print(f"predict vs transformers post-processing: max |score| {np.abs(want).max():.2f}, max "
        f"abs diff {diff:.1e}, argmax agreement {agree:.4f}")
  assert diff < TOL and agree == 1.0  # measured 2.0e-6 (max |score| 2.35), argmax all equal
