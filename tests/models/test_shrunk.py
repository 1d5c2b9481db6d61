"""SegViT-Shrunk: query down-sampling (QD) inside the ViT, the query grid of the QU head sized
from the input, and a small Shrunk model training at a non-square crop. (Parity of the QU and
single-stage ATM heads with a PyTorch reference: tests/convert/test_segvit_official.py.)"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segvit_jax import trainer
from segvit_jax.models import (Padding, build_model, input_divisor, input_padding, layers,
                               shrunk, vit)
from tests.support import perturbed, read_metrics, smoke_config

D, HEADS, MLP = 32, 4, 64


def _block_and_params(seed=0):
  block = vit.EncoderBlock(HEADS, MLP)
  x = jax.random.normal(jax.random.key(seed), (2, 24, D))
  params = nn.meta.unbox(jax.jit(block.init)(jax.random.key(1), x)["params"])
  # LayerNorm scale / bias away from 1 / 0, so a wrong normalisation would show.
  params = perturbed(params, seed=2)
  return block, params, x


def test_qd_with_every_token_as_query_is_the_ordinary_block():
  block, params, x = _block_and_params()
  plain = block.apply({"params": params}, x)
  qd = block.apply({"params": params}, x, True, 0.0, None, x)
  np.testing.assert_allclose(np.asarray(qd), np.asarray(plain), atol=1e-6, rtol=0)


def _ln(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p):
  return x @ p["kernel"] + p["bias"]


def _gelu(x):
  from scipy.special import erf  # pylint: disable=g-import-not-at-top
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def test_qd_block_with_2x2_queries_matches_a_hand_written_reference():
  # float64 NumPy: queries = top-left token of each 2x2 window of a 4x6 grid; keys / values
  # from all 24 tokens; residual from the queries.
  block, params, x = _block_and_params(seed=3)
  gh, gw = 4, 6
  queries, grid = shrunk.query_downsample(x, 0, (gh, gw), 16)
  assert grid == (2, 3) and queries.shape == (2, 6, D)
  got = np.asarray(block.apply({"params": params}, queries, True, 0.0, None, x))

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  xs = np.asarray(x, np.float64)
  down = xs.reshape(2, gh, gw, D)[:, 0::2, 0::2].reshape(2, -1, D)
  qn, kn = _ln(down, p["norm1"]), _ln(xs, p["norm1"])
  hd = D // HEADS
  split = lambda t: t.reshape(*t.shape[:2], HEADS, hd).transpose(0, 2, 1, 3)  # noqa: E731
  q = split(_dense(qn, p["attn"]["query"]))
  k = split(_dense(kn, p["attn"]["key"]))
  v = split(_dense(kn, p["attn"]["value"]))
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)  # (B, H, 6, 24)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  attn = (probs @ v).transpose(0, 2, 1, 3).reshape(2, -1, D)
  y = down + _dense(attn, p["attn"]["out"])
  h = _gelu(_dense(_ln(y, p["norm2"]), p["mlp"]["fc1"]))
  expected = y + _dense(h, p["mlp"]["fc2"])
  err = np.abs(got - expected).max()
  assert err < 1e-5, err  # measured 8.1e-7 (float32 against float64)


def test_query_downsample_keeps_prefix_tokens_and_the_top_left_of_each_window():
  b, n_prefix, gh, gw = 1, 2, 4, 6
  tokens = jnp.arange(b * (n_prefix + gh * gw), dtype=jnp.float32).reshape(b, -1, 1)
  out, grid = shrunk.query_downsample(tokens, n_prefix, (gh, gw), 16)
  assert grid == (2, 3)
  # Prefix 0, 1; patch (r, c) is token 2 + r * 6 + c; windows start at rows 0, 2, cols 0, 2, 4.
  assert np.asarray(out).ravel().tolist() == [0, 1, 2, 4, 6, 14, 16, 18]
  with pytest.raises(ValueError, match="even token grid, got 3x6: input sides must be "
                                       "multiples of 32"):
    shrunk.query_downsample(tokens[:, :2 + 18], n_prefix, (3, 6), 16)


def tiny_shrunk_config(**head):
  return dict(
      name="segvit", num_classes=5,
      backbone=dict(variant="mu/16", depth=4, shrink_idx=2, cls_in_blocks=False,
                    posemb_grid=(4, 4), final_norm=False),
      head=dict(type="shrunk", tap_layers=(1, 3), width=32, num_heads=2, query_grid=(4, 4),
                qu_layers=2, atm_layers=3, **head))


@pytest.fixture(scope="module")
def tiny_shrunk():
  """(model, unboxed params) of `tiny_shrunk_config`, initialised once (jitted) for the file."""
  model = build_model(tiny_shrunk_config())
  params = jax.jit(lambda: nn.meta.unbox(
      model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]))()
  return model, params


def test_shrunk_model_outputs_on_a_non_square_input(tiny_shrunk):
  cfg = tiny_shrunk_config()
  model, params = tiny_shrunk
  assert input_divisor(cfg) == 32
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 96, 3)), jnp.float32)
  variables = {"params": params}
  out = model.apply(variables, x)
  assert out["class_logits"].shape == (2, 5, 6)
  assert out["mask_logits"].shape == out["semantic_scores"].shape == (2, 5, 64, 96)
  # Two auxiliary outputs (ATM layers 1 and 2) on the 1/16 grid, masks not summed.
  assert [a["mask_logits"].shape for a in out["aux_outputs"]] == [(2, 5, 4, 6)] * 2
  _, aux = model.apply(variables, x, method=lambda m, x: m.encoder(x))
  assert [t.shape[1:3] for t in aux["blocks"]] == [(4, 6)] * 2 + [(2, 3)] * 2
  with pytest.raises(ValueError, match="multiples of 32"):
    model.apply(variables, jnp.zeros((1, 48, 64, 3)))


def test_qu_queries_are_resized_from_the_stored_grid(tiny_shrunk):
  # At the stored grid the queries are used as they are; at another grid the model equals one
  # whose stored queries were resized beforehand (bicubic, as a position embedding).
  model, params = tiny_shrunk
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 96, 64, 3)), jnp.float32)
  q = params["head"]["queries"]
  resized = layers.resize_posemb(q.reshape(1, 4, 4, 32), (6, 4), "bicubic").reshape(24, 32)
  cfg2 = tiny_shrunk_config()
  cfg2["head"]["query_grid"] = (6, 4)
  model2 = build_model(cfg2)
  params2 = {**params, "head": {**params["head"], "queries": resized}}
  a = model.apply({"params": params}, x)["semantic_scores"]
  b = model2.apply({"params": params2}, x)["semantic_scores"]
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  # At the stored grid, resizing is the identity.
  same = layers.resize_posemb(q.reshape(1, 4, 4, 32), (4, 4), "bicubic").reshape(16, 32)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(q))


def test_scan_layers_with_query_downsampling_is_refused():
  cfg = tiny_shrunk_config()
  cfg["backbone"]["scan_layers"] = True
  with pytest.raises(ValueError, match="scan_layers does not support query down-sampling"):
    build_model(cfg).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def test_small_shrunk_model_trains_at_a_non_square_crop(tmp_path):
  # demo smoke config (patch 8) made Shrunk: QD at block 1 of 3, QU from blocks 0 and 2, crop
  # 32 x 48 (token grid 4 x 6, then 2 x 3).
  c = smoke_config(total_steps=30, log_every=5, ckpt_every=30, **{
      "optim.lr": 2e-3, "optim.warmup_steps": 0, "dataset.num_train": 8, "batch_size": 8,
      "augment.photometric": False, "augment.flip_prob": 0.0,
      "augment.ratio_range": (1.0, 1.0), "augment.crop_size": (32, 48),
      "augment.scale": (192, 48)})
  c.model.backbone.update(depth=3, shrink_idx=1, posemb_grid=(4, 6))
  c.model.head = dict(type="shrunk", tap_layers=(0, 2), width=16, num_heads=2,
                      query_grid=(4, 6), qu_layers=1, atm_layers=2, dropout=0.0)
  trainer.train(c, str(tmp_path))
  losses = [m["loss"] for m in read_metrics(tmp_path)]
  assert len(losses) == 6
  assert losses[-1] < 0.85 * losses[0], losses  # measured: 8.93 -> 5.74


def test_shrunk_model_in_the_multi_scale_predictor(tiny_shrunk):
  # An image whose sides are not multiples of 32, windows smaller than the crop: the predictor
  # pads windows by the family's rule (to 32) and sizes the QU queries from each window's grid.
  # One 64 x 64 window over a 64 x 64 image equals whole-image inference.
  from segvit_jax.evaluation import inference  # pylint: disable=g-import-not-at-top
  cfg = tiny_shrunk_config()
  model, params = tiny_shrunk
  apply_fn = lambda p, x: model.apply({"params": p}, x)["semantic_scores"]  # noqa: E731
  rng = np.random.default_rng(4)
  assert input_padding(cfg) == Padding(32, "zero", "resize")
  kw = dict(crop=(64, 64), stride=(32, 32), padding=input_padding(cfg), window_batch=2,
            flip=False, average="softmax", bucket=64)
  for mode in ("slide", "whole"):
    predictor = inference.MultiScalePredictor(apply_fn, params, inference.Protocol(
        mode=mode, **kw), 5, mean=(127.5,) * 3, std=(127.5,) * 3)
    image = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    total = np.asarray(predictor([image], (40, 70)))[:40, :70]
    assert total.shape == (40, 70, 5) and np.isfinite(total).all()
  square = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
  slide, whole = (np.asarray(inference.MultiScalePredictor(
      apply_fn, params, inference.Protocol(mode=m, **kw), 5, mean=(127.5,) * 3,
      std=(127.5,) * 3)([square], (64, 64)))[:64, :64] for m in ("slide", "whole"))
  np.testing.assert_allclose(slide, whole, atol=1e-6, rtol=0)
