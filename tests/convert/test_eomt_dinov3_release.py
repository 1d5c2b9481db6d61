"""The EoMT release's checkpoints on DINOv3 (`--from eomt-official` / `--to eomt-official`), in
full and in the delta form of its model zoo (`delta_weights: True`: the fine-tuned encoder minus
the DINOv3 weights it started from, the rest as it is), against transformers'
EomtDinov3ForUniversalSegmentation.

References: a random EomtDinov3 model (every parameter perturbed, `attn_mask_probs` 0) and the
DINOv3ViTModel it was "fine-tuned" from (its encoder plus noise), the latter saved with
`save_pretrained` and in the facebookresearch/dinov3 .pth layout. tests/checkpoint_writers.py
writes the release's files independently of the library: the full state dict in the release's
names (`eomt_dinov3_official_state_dict`), its delta form and the release's loading of it
(`eomt_release_delta`, `eomt_release_add`: the DINOv3 weights, the fixed ImageNet pixel buffers
and the fresh mask probabilities added); the full file is what that loading gives, and the
transformers model runs it (float64, its square `image_size`). Width 384 (DINOv3-S's, 6 heads):
the release's files record no head count.

- delta import (+ the .pth or the transformers directory) equals the full import bitwise, and
  both give transformers' class and mask logits within 1e-4;
- export in full equals the full file and in delta form (`--delta_from`) the writer's delta
  (bitwise, buffers included); both re-import to the same parameters;
- `--config` adds class names and must agree with the file and its backbone;
- a delta file without `--backbone`, `--backbone` with a full file or a backbone that does not
  fit, and the flags in the wrong direction fail with one line naming what to do.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from segvit_jax import bundle
from segvit_jax.convert import __main__ as cli
from segvit_jax.convert.rules import flatten

from tests import checkpoint_writers as writers
from tests import support

HIDDEN, DEPTH, HEADS, NUM_BLOCKS, QUERIES, LABELS, IMAGE, PATCH = 384, 3, 6, 2, 6, 6, 64, 16
TOL = 1e-4  # float32 Flax ("highest" matmul precision) vs float64 torch
VIT = dict(hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
           intermediate_size=4 * HIDDEN, image_size=IMAGE, patch_size=PATCH,
           num_register_tokens=4, layer_norm_eps=1e-5)

# What a user passes with --config (the synthetic dataset's six class names); ":heads12" says
# another head count than the backbone's.
CONFIG_FILE = '''
import ml_collections

from configs import common


def get_config(arg=""):
  c = common.run_config()
  c.dataset.update(name="synthetic", num_classes=6)
  c.model = ml_collections.ConfigDict(dict(
      name="eomt", num_classes=6, num_queries=6, num_blocks=2,
      backbone=dict(width=384, depth=3, num_heads=12 if arg == "heads12" else 6, mlp_dim=1536,
                    patch_size=16, posemb_grid=(4, 4), num_registers=4, layerscale=1.0,
                    rope_theta=100.0, rope_rescale=2.0, norm_eps=1e-5, key_bias=False)))
  c.mean, c.std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
  return c
'''


def _eomt_model(seed: int) -> transformers.EomtDinov3ForUniversalSegmentation:
  config = transformers.EomtDinov3Config(num_blocks=NUM_BLOCKS, num_queries=QUERIES,
                                         num_labels=LABELS, **VIT)
  model = transformers.EomtDinov3ForUniversalSegmentation(config)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # fan-in-scaled weights, the rest around 0 / 1
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
      if name.endswith("lambda1"):
        p.copy_(0.5 + 0.1 * noise)
      elif p.ndim > 1 and not name.endswith(("cls_token", "register_tokens")):
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
      elif name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight",
                          "layernorm2d.weight")):
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.5 * noise)
    model.attn_mask_probs.zero_()  # fully annealed
  return model.eval()


def _base_key(eomt_key: str) -> str | None:
  """An EomtDinov3 encoder key (as saved) -> DINOv3ViTModel's, None outside the encoder."""
  for ours, theirs in (("embeddings.", "embeddings."), ("layers.", "layer."),
                       ("layernorm.", "norm.")):
    if eomt_key.startswith(ours):
      return theirs + eomt_key[len(ours):]
  return None


def _base_model(eomt_sd: dict, seed: int) -> transformers.DINOv3ViTModel:
  """The DINOv3 ViT the EoMT model was fine-tuned from: its encoder plus noise."""
  base = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**VIT))
  g = torch.Generator().manual_seed(seed)
  saved = writers.hf_saved_state_dict(base)
  values = {}
  for key, value in eomt_sd.items():
    name = _base_key(key)
    if name is not None:
      values[name] = torch.from_numpy(value) + 0.05 * torch.randn(value.shape, generator=g)
  values["embeddings.mask_token"] = torch.from_numpy(saved["embeddings.mask_token"])
  assert set(values) == set(saved)
  # save_pretrained's names are `layer.{i}`; the module's own `model.layer.{i}`.
  names = {k.replace("model.layer.", "layer."): k for k in base.state_dict()}
  base.load_state_dict({names[k]: v for k, v in values.items()})
  return base.eval()


def _error(capsys, *args) -> str:
  capsys.readouterr()
  assert cli.cli([str(a) for a in args]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1, err  # one line
  return err


def _params(path) -> dict:
  return flatten(bundle.load_params(str(path)))


def _state_dict(path) -> dict[str, np.ndarray]:
  obj = torch.load(str(path), weights_only=True)
  return {k: v.numpy() for k, v in obj.get("state_dict", obj).items()}


def _bitwise(a: dict, b: dict) -> bool:
  return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  root = tmp_path_factory.mktemp("eomt_dinov3_release")
  model = _eomt_model(seed=0)
  base = _base_model(writers.hf_saved_state_dict(model), seed=1)
  base.save_pretrained(str(root / "dinov3_hf"))
  base_sd = writers.hf_saved_state_dict(base)
  writers.save_torch(root / "dinov3.pth", writers.dinov3_from_hf_dinov3(
      base_sd, num_heads=HEADS, k_bias_noise=0.5))
  # The release's files: the delta of the model's weights, and the full weights the release's
  # loader makes of it (the transformers model then runs exactly those).
  saved = writers.hf_saved_state_dict(model)
  delta = writers.eomt_release_delta(writers.eomt_dinov3_official_state_dict(saved), base_sd)
  full = writers.eomt_release_add(delta, base_sd)
  model.load_state_dict({k: torch.from_numpy(full[writers.eomt_dinov3_official_key(k)])
                         for k in saved})
  writers.save_torch(root / "pytorch_model.bin", delta)  # the model zoo's files: a state dict
  writers.save_torch(root / "full.ckpt", full, wrap="state_dict")
  return dict(root=root, delta=delta, full=full, base_sd=base_sd,
              want=support.hf_eomt_outputs(model, support.normal_images(IMAGE)))


@pytest.fixture(scope="module")
def full_bundle(ref):
  path = str(ref["root"] / "bundle_full")
  assert cli.cli([str(ref["root"] / "full.ckpt"), path, "--from", "eomt-official"]) == 0
  return path


@pytest.mark.parametrize("backbone", ["dinov3.pth", "dinov3_hf"])
def test_delta_import_equals_full_import(ref, full_bundle, tmp_path, capsys, backbone):
  root = ref["root"]
  printed = support.convert_ok(capsys, root / "pytorch_model.bin", tmp_path / "b", "--from",
                               "eomt-official", "--backbone", root / backbone)
  assert (f"EoMT ViT width {HIDDEN} depth {DEPTH} heads {HEADS} patch {PATCH}" in printed
          and f"queries {QUERIES} num_blocks {NUM_BLOCKS} classes {LABELS} rope_theta 100 "
          f"(delta weights + {root / backbone})" in printed), printed
  delta, full = _params(tmp_path / "b"), _params(full_bundle)
  assert _bitwise(delta, full)  # 0 difference
  meta_delta, meta_full = (bundle.read_config(p) for p in (str(tmp_path / "b"), full_bundle))
  assert meta_delta["model"] == meta_full["model"]
  assert meta_delta["mean"] == meta_full["mean"] == [123.675, 116.28, 103.53]
  assert meta_delta["std"] == meta_full["std"] == [58.395, 57.12, 57.375]
  assert meta_delta["options"]["backbone"] == str(root / backbone)
  bb = meta_full["model"]["backbone"]
  assert (bb["rope_theta"], bb["rope_rescale"], bb["norm_eps"], bb["qkv_bias"],
          bb["key_bias"]) == (100.0, 2.0, 1e-5, True, False)

  masks, classes = support.eomt_outputs(str(tmp_path / "b"), support.normal_images(IMAGE))
  want_masks, want_classes = ref["want"]
  diff = max(float(np.max(np.abs(masks - want_masks))),
             float(np.max(np.abs(classes - want_classes))))
  # Measured: 3.1e-5 with either backbone form (mask logits up to ~31): float32 rounding.
  assert diff < TOL
  with capsys.disabled():
    print(f"{backbone}: delta == full import bitwise; vs transformers {diff:.1e}, "
          f"|mask logits| <= {np.max(np.abs(want_masks)):.0f}")


def test_export_both_forms_and_round_trip(ref, full_bundle, tmp_path, capsys):
  root = ref["root"]
  printed = support.convert_ok(capsys, full_bundle, tmp_path / "full.pth", "--to", "eomt-official")
  assert "in the eomt-official layout" in printed and "delta" not in printed
  written = _state_dict(tmp_path / "full.pth")
  assert _bitwise(written, ref["full"])  # every tensor and buffer of the release's file

  printed = support.convert_ok(capsys, full_bundle, tmp_path / "delta.bin", "--to", "eomt-official",
                               "--delta_from", root / "dinov3_hf")
  assert f"(delta weights against {root / 'dinov3_hf'})" in printed
  written = _state_dict(tmp_path / "delta.bin")
  # What the release's authors would write: the full weights minus what its loader holds.
  assert _bitwise(written, writers.eomt_release_delta(ref["full"], ref["base_sd"]))
  assert not np.any(written["network.encoder.pixel_std"])
  assert np.all(written["network.attn_mask_probs"] == -1)
  # The release's loading of the exported delta file gives the full weights back.
  loaded = writers.eomt_release_add(written, ref["base_sd"])
  ulps = max(float(np.max(np.abs(loaded[k] - v) / np.spacing(np.abs(v).astype(np.float32))))
             for k, v in ref["full"].items() if v.size)
  assert ulps <= 1  # measured: 0 (the deltas are small: (w - b) + b is exact)

  support.convert_ok(capsys, tmp_path / "full.pth", tmp_path / "b_full", "--from", "eomt-official")
  support.convert_ok(capsys, tmp_path / "delta.bin", tmp_path / "b_delta", "--from",
                     "eomt-official", "--backbone", root / "dinov3.pth")
  first = _params(full_bundle)
  assert _bitwise(_params(tmp_path / "b_full"), first)
  again = _params(tmp_path / "b_delta")
  diff = max(float(np.max(np.abs(again[k] - first[k]))) for k in first)
  assert diff <= 1e-6  # measured: 0 (float32 (w - b) + b, as above)
  with capsys.disabled():
    print(f"delta export -> release loading: {ulps:g} ulp; -> our import: {diff:.1e}")


def test_missing_or_wrong_backbone_is_explained(ref, full_bundle, tmp_path, capsys):
  root = ref["root"]
  err = _error(capsys, root / "pytorch_model.bin", tmp_path / "x", "--from", "eomt-official")
  assert (f"{root / 'pytorch_model.bin'} holds delta weights (network.encoder.pixel_std is "
          "zero): the release's DINOv3 checkpoints store the fine-tuned encoder minus the DINOv3 "
          "weights it started from. Give those weights with --backbone (width 384: the "
          "facebookresearch/dinov3 dinov3_vits16_pretrain_lvd1689m-*.pth, or a transformers "
          "directory of facebook/dinov3-vits16-pretrain-lvd1689m)") in err, err
  err = _error(capsys, root / "full.ckpt", tmp_path / "x", "--from", "eomt-official",
               "--backbone", root / "dinov3.pth")
  assert (f"--backbone {root / 'dinov3.pth'}: {root / 'full.ckpt'} holds full weights "
          "(network.encoder.pixel_std is not zero), not delta weights") in err, err
  # A DINOv3 of another depth.
  shallow = {k: v for k, v in ref["base_sd"].items() if not k.startswith(f"layer.{DEPTH - 1}.")}
  writers.save_torch(tmp_path / "shallow.pth", writers.dinov3_from_hf_dinov3(
      shallow, num_heads=HEADS))
  err = _error(capsys, root / "pytorch_model.bin", tmp_path / "x", "--from", "eomt-official",
               "--backbone", tmp_path / "shallow.pth")
  assert (f"the DINOv3 backbone {tmp_path / 'shallow.pth'} (width {HIDDEN}, depth {DEPTH - 1}) "
          "does not fit this EoMT's encoder: not in the backbone (17): "
          f"encoderblock_{DEPTH - 1}/attn/key/kernel") in err, err
  # The flags in the wrong direction or with other layouts.
  err = _error(capsys, full_bundle, tmp_path / "x", "--to", "eomt-official", "--backbone",
               root / "dinov3.pth")
  assert "--backbone applies to --from (a delta-weight file); --to writes delta weights with " \
         "--delta_from" in err
  err = _error(capsys, root / "full.ckpt", tmp_path / "x", "--from", "eomt-official",
               "--delta_from", root / "dinov3.pth")
  assert "--delta_from applies to --to" in err
  err = _error(capsys, full_bundle, tmp_path / "x", "--to", "hf-eomt-dinov3", "--delta_from",
               root / "dinov3.pth")
  assert "--delta_from applies to the layouts with delta-weight files (eomt-official), not " \
         "hf-eomt-dinov3" in err
  err = _error(capsys, root / "dinov3.pth", tmp_path / "x", "--from", "dinov3", "--backbone",
               root / "dinov3.pth")
  assert "--backbone applies to whole-model formats with delta-weight files (eomt-official), " \
         "not the backbone format dinov3" in err


def test_config_names_the_classes_and_must_agree(ref, full_bundle, tmp_path, capsys):
  """With --config, and the backbone as one of our bundles."""
  root = ref["root"]
  config = tmp_path / "eomt_dinov3_tiny.py"
  config.write_text(CONFIG_FILE)
  support.convert_ok(capsys, root / "dinov3.pth", tmp_path / "dinov3_bundle", "--from", "dinov3")
  support.convert_ok(capsys, root / "pytorch_model.bin", tmp_path / "b", "--from", "eomt-official",
                     "--backbone", tmp_path / "dinov3_bundle", "--config", config)
  meta = bundle.read_config(str(tmp_path / "b"))
  assert len(meta["class_names"]) == LABELS and meta["class_names"][0] != "class_0"
  assert tuple(meta["model"]["backbone"]["posemb_grid"]) == (4, 4)  # the file records none
  assert _bitwise(_params(tmp_path / "b"), _params(full_bundle))
  err = _error(capsys, root / "pytorch_model.bin", tmp_path / "x", "--from", "eomt-official",
               "--backbone", root / "dinov3.pth", "--config", f"{config}:heads12")
  assert (f"does not hold the model the config describes: backbone.num_heads: config 12, file "
          f"{HEADS} (the backbone {root / 'dinov3.pth'})") in err, err
