"""EoMT on DINOv3 both ways (`--from` / `--to hf-eomt-dinov3`) against transformers'
EomtDinov3ForUniversalSegmentation: small random models (with q / v biases, as the released
DINOv3 S to H+, and without, as 7B), every parameter perturbed, `attn_mask_probs` 0 (a fully
annealed model), saved with `save_pretrained` and run in float64 at their square `image_size`
(the only size transformers' EoMT-DINOv3 runs).

- import: our class and mask logits equal transformers' in eval;
- export: `from_pretrained` loads the directory with no missing or unexpected keys, its
  tensors are bitwise the original's (buffers included), and bundle -> HF -> bundle is bitwise;
- a DINOv3 bundle is refused by transformers' DINOv2 layout (and the reverse), naming the field
  (the release's layout holds both: test_eomt_dinov3_release.py); so is
  transformers' gated-MLP EoMT-DINOv3, whose head runs SiLU (the release's runs GELU).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from segvit_jax import bundle
from segvit_jax.convert import __main__ as cli
from segvit_jax.convert.rules import flatten
from tests import support

HIDDEN, DEPTH, HEADS, NUM_BLOCKS, QUERIES, LABELS, IMAGE, PATCH = 64, 4, 4, 2, 6, 5, 64, 16
KINDS = {"biases": dict(intermediate_size=4 * HIDDEN),
         "no_qv_bias": dict(intermediate_size=96, query_bias=False, value_bias=False)}
TOL = 1e-4  # float32 Flax ("highest" matmul precision) vs float64 torch


def _hf_model(kind: str, seed: int):
  config = transformers.EomtDinov3Config(
      hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
      num_blocks=NUM_BLOCKS, num_queries=QUERIES, num_labels=LABELS, image_size=IMAGE,
      patch_size=PATCH, num_register_tokens=4, layer_norm_eps=1e-5, **KINDS[kind])
  model = transformers.EomtDinov3ForUniversalSegmentation(config)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():  # fan-in-scaled weights, the rest around 0 / 1
      noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
      if name.endswith("lambda1"):
        p.copy_(0.5 + 0.1 * noise)
      elif p.ndim > 1 and not name.endswith(("cls_token", "register_tokens")):
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
      elif name.endswith("norm1.weight") or name.endswith(("norm2.weight", "layernorm.weight",
                                                           "layernorm2d.weight")):
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.5 * noise)
    model.attn_mask_probs.zero_()  # fully annealed: unmasked in eval
  return model.eval()


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
  """kind -> (save_pretrained dir, the model, its float64 (mask, class) logits)."""
  root = tmp_path_factory.mktemp("hf_eomt_dinov3")
  out = {}
  for seed, kind in enumerate(KINDS):
    model = _hf_model(kind, seed)
    path = str(root / kind)
    model.save_pretrained(path)
    out[kind] = (path, model, support.hf_eomt_outputs(model, support.normal_images(IMAGE)))
  return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_import_export_match_transformers(refs, tmp_path, capsys, kind):
  hf_dir, model, (want_masks, want_classes) = refs[kind]
  printed = support.convert_ok(capsys, hf_dir, tmp_path / "b", "--from", "hf-eomt-dinov3")
  assert (f"EoMT ViT width {HIDDEN} depth {DEPTH} heads {HEADS} patch {PATCH} grid (4, 4) "
          f"registers 4 queries {QUERIES} num_blocks {NUM_BLOCKS} classes {LABELS} "
          "rope_theta 100") in printed
  b = bundle.load_bundle(str(tmp_path / "b"))
  bb = b.config.model.backbone
  assert (bb.rope_theta, bb.rope_rescale, bb.ffn, bb.qkv_bias, bb.key_bias, bb.norm_eps) == (
      100.0, 2.0, "mlp", kind == "biases", False, 1e-5)
  masks, classes = support.eomt_outputs(b, support.normal_images(IMAGE))
  diff = max(float(np.max(np.abs(masks - want_masks))),
             float(np.max(np.abs(classes - want_classes))))
  # Measured: 1.1e-5 (biases) / 8.8e-6 (no q / v bias), mask logits up to ~21: float32
  # rounding.
  assert diff < TOL

  support.convert_ok(capsys, tmp_path / "b", tmp_path / "hf", "--to", "hf-eomt-dinov3")
  back, info = transformers.EomtDinov3ForUniversalSegmentation.from_pretrained(
      str(tmp_path / "hf"), output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  written, original = (load_file(f"{d}/model.safetensors") for d in (tmp_path / "hf", hf_dir))
  assert set(written) == set(original)
  assert all(np.array_equal(written[k], original[k]) for k in original)
  back_masks, back_classes = support.hf_eomt_outputs(back.eval(), support.normal_images(IMAGE))
  assert np.array_equal(back_masks, want_masks) and np.array_equal(back_classes, want_classes)

  support.convert_ok(capsys, tmp_path / "hf", tmp_path / "b2", "--from", "hf-eomt-dinov3")
  p1, p2 = (flatten(bundle.load_bundle(str(tmp_path / d)).variables["params"])
            for d in ("b", "b2"))
  assert set(p1) == set(p2) and all(np.array_equal(p1[k], p2[k]) for k in p1)
  with capsys.disabled():
    print(kind, f"import {diff:.1e}", f"|mask logits| <= {np.max(np.abs(want_masks)):.0f}")


def test_bundle_runs_non_square_inputs(refs, tmp_path, capsys):
  """transformers' EoMT-DINOv3 is tied to its square grid; the bundle recomputes RoPE, in
  inference and in training."""
  support.convert_ok(capsys, refs["biases"][0], tmp_path / "b", "--from", "hf-eomt-dinov3")
  b = bundle.load_bundle(str(tmp_path / "b"))
  x = np.random.default_rng(1).standard_normal((1, 48, 80, 3)).astype(np.float32)
  out = b.model.apply(b.variables, x)
  assert out["mask_logits"].shape == (1, QUERIES, 12, 20)
  assert out["semantic_scores"].shape == (1, LABELS, 48, 80)
  # Training: masked attention before each query block, RoPE with its coordinate rescale.
  train = b.model.apply(b.variables, x, train=True, mask_probs=jax.numpy.ones(NUM_BLOCKS),
                        rngs={"dropout": jax.random.key(0)})
  assert len(train["aux_outputs"]) == NUM_BLOCKS
  assert np.all(np.isfinite(train["mask_logits"]))
  assert float(np.max(np.abs(train["mask_logits"] - out["mask_logits"]))) > 1e-3


def test_layouts_refuse_the_other_backbone(refs, tmp_path, capsys):
  support.convert_ok(capsys, refs["biases"][0], tmp_path / "b", "--from", "hf-eomt-dinov3")
  # (The release's layout holds both: tests/convert/test_eomt_dinov3_release.py.)
  assert cli.cli([str(tmp_path / "b"), str(tmp_path / "hf-eomt"), "--to", "hf-eomt"]) == 1
  err = capsys.readouterr().err
  assert ("the hf-eomt layout cannot express this model: backbone.rope_theta=100.0 (a DINOv3 "
          "backbone with rotary position embeddings: --to hf-eomt-dinov3 or eomt-official)"
          ) in err, err
  assert cli.cli([refs["biases"][0], str(tmp_path / "x"), "--from", "hf-eomt"]) == 1
  assert "model_type='eomt_dinov3'; --from hf-eomt reads EoMT directories" in \
      capsys.readouterr().err
  gated = _hf_model("biases", 9)
  gated.config.update(dict(use_gated_mlp=True, hidden_act="silu"))
  transformers.EomtDinov3ForUniversalSegmentation(gated.config).save_pretrained(
      str(tmp_path / "gated"))
  assert cli.cli([str(tmp_path / "gated"), str(tmp_path / "y"), "--from", "hf-eomt-dinov3"]) == 1
  assert ("config.json: use_gated_mlp=True: transformers' EoMT-DINOv3 then runs its head (mask "
          "MLP, up-scaling) with hidden_act 'silu' too") in capsys.readouterr().err
