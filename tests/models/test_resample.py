"""The resize maths of segvit_jax.models.layers against torch's F.interpolate run in float64
(the exact operation): antialiased and scale_factor interpolation matrices, the named resize
methods, and FlexiViT PI-resize of patch-embedding kernels (timm's resample_patch_embed).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segvit_jax.models import layers

# (in, out): size 1, equal sizes, up and down by small and large factors, odd sizes.
PAIRS = [(1, 1), (1, 4), (4, 1), (1, 7), (2, 3), (3, 2), (5, 5), (7, 3), (3, 7), (6, 8), (8, 6),
         (13, 9), (9, 13), (14, 16), (16, 14), (24, 40), (40, 24), (37, 16), (16, 37), (64, 7),
         (7, 64), (37, 37)]


def _maxdiff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def _torch_matrix(n_in: int, n_out: int, mode: str, antialias: bool = False,
                  scale_factor: float | None = None) -> np.ndarray:
  # Column j of the torch result is the response to the unit impulse at j: the exact matrix.
  # Resized along W: torch 2.13's CPU antialias kernel returns wrong values for a (N, C, H, 1)
  # input resized along H (every output row equals input row 0).
  eye = torch.eye(n_in, dtype=torch.float64).reshape(1, n_in, 1, n_in)
  if scale_factor is None:
    out = F.interpolate(eye, size=(1, n_out), mode=mode, align_corners=False, antialias=antialias)
  else:
    out = F.interpolate(eye, scale_factor=(1.0, scale_factor), mode=mode, align_corners=False,
                        antialias=antialias)
  return out[0, :, 0, :].T.numpy()


def _torch_resize(x: torch.Tensor, size: tuple[int, int], method: str) -> torch.Tensor:
  """The torch call each named method stands for, on (N, C, H, W) float64."""
  if method == "bicubic_dinov2":  # DINOv2's interpolate_pos_encoding with interpolate_offset 0.1
    sf = tuple((n + 0.1) / o for n, o in zip(size, x.shape[-2:]))
    out = F.interpolate(x, scale_factor=sf, mode="bicubic")
  else:
    mode, antialias = {"bicubic": ("bicubic", False), "bicubic_antialias": ("bicubic", True),
                       "bilinear": ("bilinear", False)}[method]
    out = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=antialias)
  assert tuple(out.shape[-2:]) == tuple(size)
  return out


# ----------------------------------------------------------------------------------------------
# Interpolation matrices

@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
@pytest.mark.parametrize("n_in,n_out", PAIRS)
def test_interpolation_matrix_antialias_matches_torch(method, n_in, n_out):
  want = _torch_matrix(n_in, n_out, method, antialias=True)
  got = layers.interpolation_matrix(n_in, n_out, method, antialias=True)
  assert got.shape == (n_out, n_in) and got.dtype == np.float32
  assert _maxdiff(got, want) < 1e-6  # measured <= 5.9e-8 (float32 storage of the weights)
  # The float64 weights behind it are torch's formula, not an approximation of it:
  # measured <= 1.0e-15 here, <= 4.0e-15 in the scale_factor test below.
  assert _maxdiff(layers._interpolation_matrix64(n_in, n_out, method, True, None), want) < 1e-12


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
@pytest.mark.parametrize("n_in,n_out", PAIRS)
def test_interpolation_matrix_scale_factor_matches_torch(method, antialias, n_in, n_out):
  # DINOv2's offset (sf = (out + 0.1) / in), plus scale factors unrelated to out; torch's
  # output size is floor(in * sf).
  for sf in [(n_out + 0.1) / n_in, 0.37, 1.5, 3.3]:
    out = n_out if sf == (n_out + 0.1) / n_in else int(np.floor(n_in * sf))
    if out < 1:
      continue
    want = _torch_matrix(n_in, out, method, antialias, scale_factor=sf)
    assert want.shape == (out, n_in)
    got = layers.interpolation_matrix(n_in, out, method, antialias, sf)
    assert _maxdiff(got, want) < 1e-6, sf  # measured <= 5.9e-8
    assert _maxdiff(layers._interpolation_matrix64(n_in, out, method, antialias, sf), want) < 1e-12


@pytest.mark.parametrize("method", layers.RESIZE_METHODS)
@pytest.mark.parametrize("n_in,n_out", [p for p in PAIRS if p[0] > 1])
def test_resize_matrix_matches_torch(method, n_in, n_out):
  x = torch.eye(n_in, dtype=torch.float64).reshape(1, n_in, 1, n_in)
  want = _torch_resize(x, (1, n_out), method)[0, :, 0, :].T
  assert _maxdiff(layers.resize_matrix(n_in, n_out, method), want) < 1e-12  # measured <= 3.6e-15


def test_symbolic_resize_matrix_equals_the_numpy_one():
  """The jnp matrices of symbolic sizes (`jax.export`, `layers.symbolic_resize_matrix`): traced
  once per method with symbolic in / out sizes, evaluated at every pair; the float32 rounding of
  the source coordinates is the difference."""
  worst = 0.0
  for method in layers.RESIZE_METHODS:
    n, m = jax.export.symbolic_shape("n, m")
    exp = jax.export.export(jax.jit(
        lambda a, b, method=method: layers.symbolic_resize_matrix(a.shape[0], b.shape[0],
                                                                   method)),
        platforms=("cpu",))(jax.ShapeDtypeStruct((n,), np.float32),
                            jax.ShapeDtypeStruct((m,), np.float32))
    for n_in, n_out in [(4, 1), (3, 7), (13, 9), (14, 16), (37, 16), (7, 64)]:  # (one compile each)
      got = exp.call(np.zeros(n_in, np.float32), np.zeros(n_out, np.float32))
      worst = max(worst, _maxdiff(got, layers.resize_matrix(n_in, n_out, method)))
  print(f"symbolic vs numpy resize matrices: max abs diff {worst:.1e}")
  assert worst < 1e-5, worst  # measured 3.6e-6 (float32 against the float64 numpy matrices)


def test_resize_methods_table():
  assert layers.RESIZE_METHODS == ("bicubic", "bicubic_antialias", "bicubic_dinov2", "bilinear")
  x = np.zeros((1, 4, 4, 2), np.float32)
  for args in [((4, 4), "bicubic_aa"), ((6, 6), "nearest")]:  # same size must fail too
    with pytest.raises(ValueError) as err:
      layers.resize_posemb(x, *args)
    assert all(repr(m) in str(err.value) for m in layers.RESIZE_METHODS)
  with pytest.raises(ValueError):
    layers.interpolation_matrix(4, 6, "bicubic_antialias")  # a name, not a kernel


# ----------------------------------------------------------------------------------------------
# Named methods on position embeddings

@pytest.mark.parametrize("method", layers.RESIZE_METHODS)
@pytest.mark.parametrize("src,dst", [((24, 24), (40, 40)), ((40, 40), (24, 24)),
                                     ((37, 37), (32, 48)), ((37, 37), (16, 16)),
                                     ((6, 6), (6, 8)), ((7, 5), (3, 11)), ((9, 4), (12, 2))])
def test_resize_posemb_named_methods_match_torch(method, src, dst):
  # (6, 6) -> (6, 8) keeps one axis: "bicubic_dinov2" still resamples it (sf = 6.1 / 6), as
  # the original code does; the others leave it alone.
  x = np.random.default_rng(0).standard_normal((1, *src, 16)).astype(np.float32)
  got = jax.jit(layers.resize_posemb, static_argnums=(1, 2))(x, dst, method)
  want = _torch_resize(torch.from_numpy(x).double().permute(0, 3, 1, 2), dst, method)
  assert _maxdiff(got, want.permute(0, 2, 3, 1)) < 1e-6  # measured <= 6.0e-7 (float32)


# ----------------------------------------------------------------------------------------------
# FlexiViT PI-resize of patch kernels

def _torch_resize_patches(x: np.ndarray, size: tuple[int, int], method: str) -> np.ndarray:
  """(N, ph, pw, C) -> (N, *size, C), float64."""
  t = torch.from_numpy(x).double().permute(0, 3, 1, 2)
  return _torch_resize(t, size, method).permute(0, 2, 3, 1).numpy()


def _torch_resize_transposed(old: tuple[int, int], new: tuple[int, int], method: str):
  """R^T, (ph*pw, nh*nw): row i is the one-hot patch i resized by torch."""
  n = old[0] * old[1]
  basis = np.eye(n).reshape(n, *old, 1)
  return _torch_resize_patches(basis, new, method).reshape(n, -1)


@pytest.mark.parametrize("method", layers.RESIZE_METHODS)
@pytest.mark.parametrize("old,new", [((14, 14), (16, 16)), ((8, 8), (12, 12)),
                                     ((8, 6), (12, 10))])
def test_resample_patch_kernel_preserves_tokens_when_upsampling(method, old, new):
  # R^T has full row rank, so R^T pinv(R^T) = I: <resize(x), new_kernel> = <x, kernel>
  # for every patch x.
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((*old, 3, 8)).astype(np.float32)
  x = rng.standard_normal((32, *old, 3))
  new_kernel = layers.resample_patch_kernel(kernel, new, method)
  assert new_kernel.shape == (*new, 3, 8) and new_kernel.dtype == np.float32
  want = np.einsum("nhwc,hwcd->nd", x, kernel.astype(np.float64))
  got = np.einsum("nhwc,hwcd->nd", _torch_resize_patches(x, new, method),
                  new_kernel.astype(np.float64))
  rel = _maxdiff(got, want) / np.max(np.abs(want))
  assert rel < 1e-4, rel  # measured <= 3.3e-8 (float32 rounding of the new kernel)


@pytest.mark.parametrize("method", layers.RESIZE_METHODS)
def test_resample_patch_kernel_least_squares_when_downsampling(method):
  # 16 -> 14: R^T is (256, 196), so no kernel reproduces every token; PI-resize gives the
  # least-squares w' = argmin ||R^T w' - w|| (unique, as R^T has full column rank).
  rng = np.random.default_rng(1)
  kernel = rng.standard_normal((16, 16, 3, 8)).astype(np.float32)
  rt = _torch_resize_transposed((16, 16), (14, 14), method)
  assert np.linalg.matrix_rank(rt) == 14 * 14
  want = np.linalg.lstsq(rt, kernel.reshape(256, -1).astype(np.float64), rcond=None)[0]
  got = layers.resample_patch_kernel(kernel, (14, 14), method)
  rel = _maxdiff(got.reshape(196, -1), want) / np.max(np.abs(want))
  assert rel < 1e-5, rel  # measured <= 4.8e-8


def test_resample_patch_kernel_matches_timm_recipe():
  # timm's resample_patch_embed (as EoMT uses for DINOv2 14 -> 16), re-done in torch float64:
  # resize matrix from one-hot patches through F.interpolate(bicubic, antialias=True), then
  # torch.linalg.pinv, on a torch-layout (D, Cin, ph, pw) kernel.
  kernel = np.random.default_rng(2).standard_normal((14, 14, 3, 8)).astype(np.float32)
  basis = torch.eye(196, dtype=torch.float64).reshape(196, 1, 14, 14)
  resize_mat = F.interpolate(basis, size=(16, 16), mode="bicubic", antialias=True)
  resize_mat = resize_mat.reshape(196, 256).T  # R: (new, old)
  pinv = torch.linalg.pinv(resize_mat.T)
  tk = torch.from_numpy(kernel).double().permute(3, 2, 0, 1).reshape(24, 196)
  want = (tk @ pinv.T).reshape(8, 3, 16, 16).permute(2, 3, 1, 0)
  got = layers.resample_patch_kernel(kernel, (16, 16))
  assert _maxdiff(got, want) < 1e-5  # measured 2.2e-7 (float32 output; |new kernel| <= 4.6)


def test_resample_patch_kernel_same_size_is_identity():
  kernel = np.random.default_rng(3).standard_normal((14, 14, 3, 8)).astype(np.float32)
  out = layers.resample_patch_kernel(kernel, (14, 14))
  assert out.dtype == kernel.dtype and np.array_equal(out, kernel)
