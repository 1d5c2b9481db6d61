"""Our ViT against (a) the independent torch ViT in tests/torch_reference.py and (b)
transformers' ViTModel, with identical (randomised) weights; and the position-embedding /
mask resize against torch's F.interpolate (align_corners=False).

The torch models run in float64, so the differences are the Flax float32 rounding error.
JAX matmuls use "highest" precision (a no-op on CPU; on GPU/TPU the default would use
TF32/bf16 passes).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from segvit_jax.models import layers, vit

from tests import torch_reference as ref

SIZE = dict(width=64, depth=4, mlp_dim=128, num_heads=4)
PATCH = 8
POSEMB_GRID = (6, 6)
TOL = 1e-5


def _maxdiff(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def _nchw(images: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(images).permute(0, 3, 1, 2).double()


def _images(h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((2, h, w, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def params():
  """Random parameters of a ViT with a cls token and a final norm (a superset of every
  variant tested here: the cls-dropped model ignores `cls`, the no-final-norm one
  `encoder_norm`)."""
  model = vit.Model(variant=f"Ti/{PATCH}", **SIZE, posemb_grid=POSEMB_GRID)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 3)))
  p = ref.randomize_params(nn.meta.unbox(abstract)["params"], seed=3)
  return jax.tree_util.tree_map(jnp.asarray, p)


@pytest.fixture(scope="module")
def flax_outputs(params):
  """All the Flax forward passes the tests need, in one jit (CPU compiles dominate)."""
  with_cls = vit.Model(variant=f"Ti/{PATCH}", **SIZE, posemb_grid=POSEMB_GRID,
                       cls_in_blocks=True, final_norm=True)
  no_cls = vit.Model(variant=f"Ti/{PATCH}", **SIZE, posemb_grid=POSEMB_GRID,
                     cls_in_blocks=False, final_norm=False)
  p_no_cls = {k: v for k, v in params.items() if k != "encoder_norm"}

  def run(p, sq, wide, odd):
    return {
        "cls_square": with_cls.apply({"params": p}, sq),  # 6x6 grid: no resize
        "cls_wide": with_cls.apply({"params": p}, wide),  # 6x8: resize up in W
        "nocls_odd": no_cls.apply({"params": {k: p[k] for k in p_no_cls}}, odd),  # 5x12
    }

  with jax.default_matmul_precision("highest"):
    return jax.jit(run)(params, _images(48, 48), _images(48, 64, 1), _images(40, 96, 2))


@pytest.mark.parametrize("key,cls_in_blocks,final_norm,h,w,seed", [
    ("cls_wide", True, True, 48, 64, 1),
    ("nocls_odd", False, False, 40, 96, 2),  # grid 5x12: down in H, up in W
])
def test_vit_matches_torch_reference(params, flax_outputs, key, cls_in_blocks, final_norm, h,
                                     w, seed):
  tokens, aux = flax_outputs[key]
  tvit = ref.ViT(**SIZE, patch_size=PATCH, posemb_grid=POSEMB_GRID, cls_token=True,
                 cls_in_blocks=cls_in_blocks, final_norm=final_norm).double().eval()
  p = jax.tree_util.tree_map(np.asarray, params)
  if not final_norm:
    p = {k: v for k, v in p.items() if k != "encoder_norm"}
  ref.load_vit_from_flax(tvit, p)
  with torch.no_grad():
    ttokens, tblocks = tvit(_nchw(_images(h, w, seed)))
  assert tokens.shape == (2, h // PATCH, w // PATCH, SIZE["width"])
  diffs = {"tokens": _maxdiff(tokens, ttokens)}
  diffs.update({f"block_{i}": _maxdiff(a, b)
                for i, (a, b) in enumerate(zip(aux["blocks"], tblocks, strict=True))})
  print(key, {k: f"{v:.1e}" for k, v in diffs.items()})
  # Measured: every block output and the final tokens <= 3.6e-6 (values up to ~10).
  bad = {k: v for k, v in diffs.items() if not v < TOL}
  assert not bad, bad


@pytest.fixture(scope="module")
def hf_model(params):
  config = transformers.ViTConfig(
      hidden_size=SIZE["width"], num_hidden_layers=SIZE["depth"],
      num_attention_heads=SIZE["num_heads"], intermediate_size=SIZE["mlp_dim"],
      image_size=POSEMB_GRID[0] * PATCH, patch_size=PATCH, num_channels=3, hidden_act="gelu",
      layer_norm_eps=1e-6, qkv_bias=True, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0)
  model = transformers.ViTModel(config, add_pooling_layer=False).double().eval()
  ref.load_hf_vit_from_flax(model, jax.tree_util.tree_map(np.asarray, params), SIZE["depth"])
  return model


@pytest.mark.parametrize("key,h,w,seed", [
    ("cls_square", 48, 48, 0),  # the stored grid
    ("cls_wide", 48, 64, 1),  # HF interpolates its (square) grid bicubically to 6x8
])
def test_vit_matches_transformers(flax_outputs, hf_model, key, h, w, seed):
  tokens, aux = flax_outputs[key]
  with torch.no_grad():
    hidden = hf_model(pixel_values=_nchw(_images(h, w, seed)),
                      interpolate_pos_encoding=(h, w) != (48, 48)).last_hidden_state
  gh, gw = h // PATCH, w // PATCH
  d_tokens = _maxdiff(tokens, hidden[:, 1:].reshape(2, gh, gw, SIZE["width"]))
  d_cls = _maxdiff(aux["cls"], hidden[:, 0])
  print(key, f"tokens {d_tokens:.1e} cls {d_cls:.1e}")
  # Measured: tokens <= 1.6e-6, cls <= 1.3e-6 (square and non-square input).
  assert d_tokens < TOL and d_cls < TOL, (d_tokens, d_cls)


# ----------------------------------------------------------------------------------------------
# Resize against F.interpolate

SIZES = [(6, 6), (6, 8), (24, 40), (40, 24), (7, 3), (3, 7), (5, 12), (1, 4), (4, 1), (13, 9)]


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
@pytest.mark.parametrize("n_in,n_out", SIZES)
def test_interpolation_matrix_matches_torch(method, n_in, n_out):
  # Column j of the torch result is the response to the unit impulse at j: the exact matrix.
  eye = torch.eye(n_in, dtype=torch.float64).reshape(1, n_in, n_in, 1)  # (N, C=j, H, W=1)
  want = F.interpolate(eye, size=(n_out, 1), mode=method, align_corners=False)[0, :, :, 0].T
  got = layers.interpolation_matrix(n_in, n_out, method)
  assert got.shape == (n_out, n_in)
  assert _maxdiff(got, want) < 1e-6  # measured <= 4.4e-8 (float32 storage of the weights)


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
@pytest.mark.parametrize("src,dst", [((24, 24), (40, 40)), ((40, 40), (24, 24)),
                                     ((6, 6), (6, 8)), ((6, 6), (5, 12)), ((7, 5), (3, 11)),
                                     ((9, 4), (12, 2))])
def test_resize_posemb_matches_torch(method, src, dst):
  x = np.random.default_rng(0).standard_normal((1, *src, 16)).astype(np.float32)
  got = jax.jit(layers.resize_posemb, static_argnums=(1, 2))(x, dst, method)
  want = F.interpolate(torch.from_numpy(x).double().permute(0, 3, 1, 2), size=dst, mode=method,
                       align_corners=False).permute(0, 2, 3, 1)
  # Against torch in float64 (the exact operation): measured <= 6.0e-7 (float32 output
  # rounding). NB torch's own float32 kernels compute the source coordinates and weights in
  # float32 and are off by up to 2.5e-5 here (24 <-> 40), so they are not the yardstick.
  assert _maxdiff(got, want) < 1e-6


@pytest.mark.parametrize("src,dst", [((6, 8), (48, 64)), ((5, 12), (40, 96)), ((8, 6), (5, 3))])
def test_upsample_masks_matches_torch(src, dst):
  x = np.random.default_rng(1).standard_normal((2, 5, *src)).astype(np.float32)
  got = jax.jit(layers.upsample_masks, static_argnums=1)(x, dst)
  want = F.interpolate(torch.from_numpy(x).double(), size=dst, mode="bilinear",
                       align_corners=False)
  assert _maxdiff(got, want) < 1e-6  # float64 torch, as above; measured <= 3e-7
