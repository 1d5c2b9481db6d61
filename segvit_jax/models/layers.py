"""Building blocks shared by every model family: one attention (with optional rotary position
embeddings; its implementation chosen by `ATTENTION_IMPLEMENTATIONS`), one MLP, drop path, one
LayerNorm helper, one resize (position embeddings, patch kernels, masks: torch's F.interpolate
as matrices) and the mask-classification `semantic_scores`. The CPU rewrites of convolutions
live in `cpu_ops`.

Logical axis names (mapped to mesh axes by `segvit_jax.sharding`):
  parameters: `embed` (model width), `mlp` (hidden width), `heads` (attention width,
              heads contiguous),
              `classes`, `queries`, `layers` (the depth axis of scanned ViT blocks);
  activations: `act_batch`, `act_len`, `act_embed`, `act_heads`, `act_mlp`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jax.Array]
trunc_normal_02 = nn.initializers.truncated_normal(stddev=0.02)


def logical(init: Initializer, axes: Sequence[str | None]) -> Initializer:
  return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  return nn.with_logical_constraint(x, tuple(axes))


def layer_norm(name: str, eps: float = 1e-5, dtype: Any = jnp.float32) -> nn.LayerNorm:
  """The LayerNorm of every model here: over the last axis, scale and bias on the logical
  "embed" axis. `eps` defaults to torch's nn.LayerNorm's; each model passes its own."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name,
                      scale_init=logical(nn.initializers.ones, ("embed",)),
                      bias_init=logical(nn.initializers.zeros, ("embed",)))


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example (scaled by 1 / keep).

  `rate` may be a traced scalar (per-block rates scanned over by `nn.scan`); a traced 0 keeps
  every example. `rng` replaces the module's own "dropout" stream (the ViT hands each block a
  key so that scanned and unrolled blocks draw the same masks)."""

  rate: float | jax.Array

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool,
               rng: jax.Array | None = None) -> jax.Array:
    if deterministic or (not isinstance(self.rate, jax.Array) and self.rate == 0.0):
      return x  # (a traced rate is never known to be 0 here)
    # float32 arithmetic whether the rate is a constant or traced: same masks, same scale.
    keep = 1.0 - jnp.asarray(self.rate, jnp.float32)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout") if rng is None else rng, keep, shape)
    return jnp.where(mask, x * (1.0 / keep), 0.0).astype(x.dtype)


class Mlp(nn.Module):
  """Two Dense layers with an activation between them (ViT: GELU, decoders: ReLU)."""

  hidden_dim: int
  activation: Callable[[jax.Array], jax.Array] = functools.partial(nn.gelu, approximate=False)
  dropout: float = 0.0
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    d = x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc1",
                 kernel_init=logical(self.kernel_init, ("embed", "mlp")),
                 bias_init=logical(self.bias_init, ("mlp",)))(x)
    x = constrain(self.activation(x), ("act_batch", "act_len", "act_mlp"))
    x = nn.Dropout(self.dropout)(x, deterministic)
    return nn.Dense(d, dtype=self.dtype, name="fc2",
                    kernel_init=logical(self.kernel_init, ("mlp", "embed")),
                    bias_init=logical(self.bias_init, ("embed",)))(x)


# How `Attention` computes softmax(q k^T / sqrt(hd)) v: the model config's `attention` key
# (configs/common.py), threaded to every attention of every family.
#   "auto"      cuDNN's fused flash attention where it applies (`use_cudnn`: an NVIDIA GPU of
#               compute capability >= 8.0, bfloat16 / float16, head size a multiple of 8 up to
#               128, no mask), else "xla"; on a CPU exactly "xla"
#   "xla"       jax.nn.dot_product_attention(implementation="xla"): XLA's einsum-softmax-einsum
#   "cudnn"     jax.nn.dot_product_attention(implementation="cudnn") everywhere, masks included
#               (jax passes a mask to cuDNN as an additive bias); an error where cuDNN cannot run
#   "explicit"  the softmax written out (the reference the others are tested against)
# Whatever the setting, an attention whose probabilities are needed runs the explicit path:
# SegViT's ATM cross-attention (its masks are the logits) and attention dropout in training
# (ATM decoder layers); fused kernels return neither.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "explicit")
# Limits of jax 0.10's cuDNN flash attention (jax._src.cudnn.fused_attention_stablehlo
# `check_is_flash_attention`: head size <= 128 before Hopper, <= 256 from it, a multiple of 8;
# fp16 / bf16 inputs; Ampere or later for flash kernels). A mask becomes a bias, whose
# training form needs even sequence lengths (EoMT's are odd: queries + cls + registers +
# patches) and has open gradient bugs: "auto" keeps masked attention on XLA.
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128


@functools.lru_cache(maxsize=None)
def cudnn_device() -> bool:
  """Whether jax's first device is an NVIDIA GPU cuDNN's flash attention runs on (compute
  capability >= 8.0)."""
  device = jax.devices()[0]
  if device.platform != "gpu" or "nvidia" not in device.device_kind.lower():
    return False
  capability = getattr(device, "compute_capability", None)
  return capability is None or float(capability) >= 8.0


def attention_implementation(name: str, dtype: Any, head_dim: int, masked: bool) -> str:
  """The implementation ("xla", "cudnn" or "explicit") an attention of this compute `dtype`,
  head size and mask runs with under the setting `name` (ATTENTION_IMPLEMENTATIONS)."""
  if name not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {name!r}; expected one of "
                     f"{', '.join(map(repr, ATTENTION_IMPLEMENTATIONS))}")
  fits = jnp.dtype(dtype) in CUDNN_DTYPES and head_dim % 8 == 0 and (
      head_dim <= CUDNN_MAX_HEAD_DIM)
  if name == "auto":
    return "cudnn" if fits and not masked and cudnn_device() else "xla"
  if name == "cudnn":
    if not cudnn_device():
      raise ValueError(f"attention='cudnn' needs an NVIDIA GPU of compute capability >= 8.0; "
                       f"jax runs on {jax.devices()[0].device_kind!r}: use 'auto' or 'xla'")
    if not fits:
      raise ValueError(f"attention='cudnn' needs bfloat16 or float16 (model.dtype) and a head "
                       f"size that is a multiple of 8 up to {CUDNN_MAX_HEAD_DIM}; got "
                       f"{jnp.dtype(dtype).name} and {head_dim}: use 'auto' or 'xla'")
  return name


def attention_setting(model_cfg: Any) -> str:
  """A model config's `attention` (ATTENTION_IMPLEMENTATIONS); "auto", the skeleton's default
  (configs/common.py), for model configs written before the key existed (older bundles)."""
  return model_cfg.get("attention", "auto")


class Attention(nn.Module):
  """Multi-head attention with separate query/key/value projections.

  With `return_logits`, also returns the pre-softmax logits `(q k^T) * head_dim^-0.5` averaged
  over heads, (B, Nq, Nk): SegViT's Attention-to-Mask reads its masks from them (SegViT Sec.
  3.2, Eq. (2)-(3); the head average as the authors' release); they are returned unmasked.

  `mask`: optional boolean attention mask, True where a query may attend to a key,
  broadcastable to (B, heads, Nq, Nk) (EoMT's masked attention, EoMT Sec. 3.3, Fig. 3).
  Every query must keep at least one key.

  `rope`: optional (sin, cos), each (n, head_dim) (`rope_sin_cos`): rotary position
  embeddings applied to the queries and keys of the last n tokens (the patches; prefix tokens
  such as cls, registers and EoMT's queries are not rotated), self-attention only.
  `qkv_bias=False` drops the query / key / value biases, `key_bias=False` the key's alone
  (DINOv3: its release masks the key bias to zero, transformers has none).

  `implementation`: one of ATTENTION_IMPLEMENTATIONS (`attention_implementation` picks what
  runs); with `return_logits` or dropout in training the explicit path runs regardless.
  """

  num_heads: int
  dropout: float = 0.0  # on the attention probabilities
  return_logits: bool = False
  qkv_bias: bool = True
  key_bias: bool = True
  implementation: str = "auto"
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_q: jax.Array, x_kv: jax.Array | None = None,
               deterministic: bool = True, mask: jax.Array | None = None,
               rope: tuple[jax.Array, jax.Array] | None = None):
    if rope is not None and x_kv is not None:
      raise ValueError("rotary position embeddings need self-attention (no separate keys / "
                       "values)")
    x_kv = x_q if x_kv is None else x_kv
    d = x_q.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}")
    head_dim = d // self.num_heads
    # Plain (D, D) kernels, heads contiguous along the output axis (torch / timm layout).
    proj = functools.partial(
        nn.Dense, d, dtype=self.dtype,
        kernel_init=logical(self.kernel_init, ("embed", "heads")),
        bias_init=logical(self.bias_init, ("heads",)))
    split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, head_dim)  # noqa: E731
    q = split(proj(name="query", use_bias=self.qkv_bias)(x_q))  # (B, Nq, H, hd)
    k = split(proj(name="key", use_bias=self.qkv_bias and self.key_bias)(x_kv))
    v = split(proj(name="value", use_bias=self.qkv_bias)(x_kv))
    if rope is not None:
      q, k = apply_rope(q, rope), apply_rope(k, rope)
    q = constrain(q, ("act_batch", "act_len", "act_heads", None))

    need_probs = self.return_logits or (self.dropout > 0.0 and not deterministic)
    implementation = attention_implementation(self.implementation, q.dtype, head_dim,
                                              mask is not None)
    if need_probs or implementation == "explicit":
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
      masked = logits.astype(jnp.float32)
      if mask is not None:  # the finite fill of jax.nn.dot_product_attention
        masked = jnp.where(mask, masked, -0.7 * jnp.finfo(jnp.float32).max)
      probs = jax.nn.softmax(masked, axis=-1).astype(v.dtype)
      probs = nn.Dropout(self.dropout)(probs, deterministic)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)

    out = nn.Dense(d, dtype=self.dtype, name="out",
                   kernel_init=logical(self.kernel_init, ("heads", "embed")),
                   bias_init=logical(self.bias_init, ("embed",)))(out.reshape(*out.shape[:-2], d))
    if self.return_logits:
      return out, logits.mean(axis=1)
    return out


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings on the patch grid (DINOv3, Simeoni et al. 2025; the
# facebookresearch/dinov3 release's layers/rope_position_encoding.py, transformers'
# DINOv3ViTRopePositionEmbedding): axial, no learned weights. Patch centres are normalised
# per axis to [-1, 1] ("separate": y / gh and x / gw), optionally augmented in training, and
# each head's dimensions rotate by 2 pi coord / period with head_dim / 4 periods per axis,
# theta ** (4 j / head_dim), j = 0 .. head_dim / 4 - 1.

def rope_coords(grid: tuple[int, int]) -> np.ndarray:
  """(gh * gw, 2) float32 (y, x) patch centres in [-1, 1], row-major: 2 (i + 0.5) / g - 1
  (a jnp array for a symbolic `jax.export` grid)."""
  gh, gw = grid
  if not (is_static(gh) and is_static(gw)):  # symbolic (jax.export): the same in jnp
    ys = (jnp.arange(gh, dtype=jnp.float32) + 0.5) / jnp.asarray(gh, jnp.float32)
    xs = (jnp.arange(gw, dtype=jnp.float32) + 0.5) / jnp.asarray(gw, jnp.float32)
    coords = jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)
    return 2.0 * coords - 1.0
  ys = np.arange(0.5, gh, dtype=np.float32) / np.float32(gh)
  xs = np.arange(0.5, gw, dtype=np.float32) / np.float32(gw)
  coords = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)
  return np.float32(2.0) * coords - np.float32(1.0)


def rope_augment(coords: jax.Array, rng: jax.Array, *, shift: float | None = None,
                 jitter: float | None = None, rescale: float | None = None) -> jax.Array:
  """DINOv3's training-time coordinate augmentations, one draw per call (transformers draws
  once per forward pass; the release once per block): add a uniform shift in [-shift, shift]
  per axis, multiply per axis by a log-uniform jitter in [1 / jitter, jitter], then both axes
  by one log-uniform factor in [1 / rescale, rescale]. None skips a step."""
  k_shift, k_jitter, k_rescale = jax.random.split(rng, 3)
  coords = jnp.asarray(coords, jnp.float32)
  if shift is not None:
    coords = coords + jax.random.uniform(k_shift, (1, 2), jnp.float32, -shift, shift)
  if jitter is not None:
    r = float(np.log(jitter))
    coords = coords * jnp.exp(jax.random.uniform(k_jitter, (1, 2), jnp.float32, -r, r))
  if rescale is not None:
    r = float(np.log(rescale))
    coords = coords * jnp.exp(jax.random.uniform(k_rescale, (1, 1), jnp.float32, -r, r))
  return coords


def rope_sin_cos(coords: jax.Array, head_dim: int, theta: float
                 ) -> tuple[jax.Array, jax.Array]:
  """(sin, cos), each (N, head_dim) float32, of (N, 2) coordinates: angles
  2 pi coord_a / period_j laid out [y periods | x periods], the whole repeated twice (the
  rotate-half pairing of `apply_rope`)."""
  if head_dim % 4:
    raise ValueError(f"rotary position embeddings need head_dim divisible by 4, got {head_dim}")
  periods = np.float32(theta) ** (4.0 * np.arange(head_dim // 4, dtype=np.float32) / head_dim)
  coords = jnp.asarray(coords, jnp.float32)
  angles = 2 * np.pi * coords[:, :, None] / jnp.asarray(periods, jnp.float32)  # (N, 2, hd/4)
  angles = jnp.tile(angles.reshape(coords.shape[0], -1), (1, 2))  # (N, hd)
  return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
  """x (B, N, heads, hd): the last n = len(sin) tokens rotated, x * cos + rotate_half(x) * sin
  with rotate_half([a, b]) = [-b, a], in float32 (as the release), the rest unchanged."""
  sin, cos = rope
  n = sin.shape[0]
  if n > x.shape[1]:
    raise ValueError(f"{n} rotary positions for {x.shape[1]} tokens")
  prefix, patches = x[:, :x.shape[1] - n], x[:, x.shape[1] - n:].astype(jnp.float32)
  a, b = jnp.split(patches, 2, axis=-1)
  rotated = jnp.concatenate([-b, a], axis=-1)
  patches = patches * cos[:, None, :] + rotated * sin[:, None, :]
  return jnp.concatenate([prefix, patches.astype(x.dtype)], axis=1)


def _cubic_near(x, a: float):  # Keys cubic convolution, |x| <= 1
  return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_far(x, a: float):  # Keys cubic convolution, 1 < |x| < 2
  return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
  """Keys cubic-convolution weights for taps at offsets -1, 0, 1, 2 from floor(x)."""
  return np.stack([_cubic_far(t + 1, a), _cubic_near(t, a), _cubic_near(1 - t, a),
                   _cubic_far(2 - t, a)], axis=-1)


def _aa_filter(x: np.ndarray, method: str) -> np.ndarray:
  """torch's antialias filters: Keys cubic with a = -0.5 (as PIL), or the triangle."""
  x = np.abs(x)
  if method == "bicubic":
    return np.where(x < 1, _cubic_near(x, -0.5), np.where(x < 2, _cubic_far(x, -0.5), 0.0))
  return np.maximum(1.0 - x, 0.0)


@functools.lru_cache(maxsize=256)
def _interpolation_matrix64(in_size: int, out_size: int, method: str, antialias: bool,
                            scale_factor: float | None) -> np.ndarray:
  if method not in ("bicubic", "bilinear"):
    raise ValueError(f"unknown interpolation method {method!r}; expected 'bicubic' or 'bilinear'")
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
  if scale_factor is not None and not scale_factor > 0:
    raise ValueError(f"scale_factor must be positive, got {scale_factor}")
  # torch copies equal-size axes in its antialias and (bi)linear kernels, even when given a
  # scale_factor; its plain bicubic kernel applies the scale_factor's scale regardless.
  if in_size == out_size and (antialias or method == "bilinear"):
    m = np.eye(in_size)
    m.flags.writeable = False
    return m
  # torch's area_pixel_compute_scale: 1 / scale_factor when one is given, else in / out.
  scale = in_size / out_size if scale_factor is None else 1.0 / scale_factor
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  if antialias:
    # torch's separable "aa" kernels (HelperInterpBase::_compute_weights_aa): the filter is
    # stretched by the scale when downsampling, truncated to the window and renormalised.
    support = (2.0 if method == "bicubic" else 1.0) * max(scale, 1.0)
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    max_taps = int(np.ceil(support)) * 2 + 1
    for i in rows:
      center = scale * (i + 0.5)
      lo = max(int(center - support + 0.5), 0)  # int() truncates like torch's cast
      n = min(max(min(int(center + support + 0.5), in_size) - lo, 0), max_taps)
      idx = np.arange(lo, lo + n)
      w = _aa_filter((idx - center + 0.5) * invscale, method)
      total = w.sum()
      m[i, idx] = w / total if total != 0.0 else w
  elif method == "bicubic":
    # A = -0.75 and clamped border taps; index and fraction guarded as torch's
    # guard_index_and_lambda (only matters for scale factors torch would not produce).
    src = (rows + 0.5) * scale - 0.5
    base = np.minimum(np.floor(src), in_size - 1)
    w = _cubic_weights(np.clip(src - base, 0.0, 1.0), -0.75)
    for tap in range(4):
      idx = np.clip(base.astype(int) - 1 + tap, 0, in_size - 1)
      np.add.at(m, (rows, idx), w[:, tap])
  else:
    src = np.maximum((rows + 0.5) * scale - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = np.clip(src - lo, 0.0, 1.0)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
  m.flags.writeable = False  # cached
  return m


@functools.lru_cache(maxsize=256)
def interpolation_matrix(in_size: int, out_size: int, method: str = "bicubic",
                         antialias: bool = False, scale_factor: float | None = None) -> np.ndarray:
  """(out_size, in_size) float32 matrix M with `out = M @ in`, equal to torch's
  F.interpolate(mode=method, align_corners=False, antialias=antialias) along one axis.

  'bicubic' uses A = -0.75 with clamped borders; with antialias, torch's (PIL-like) a = -0.5
  filter, widened by the scale when downsampling, weights renormalised per output. `scale_factor`
  mimics F.interpolate(scale_factor=sf) (recompute_scale_factor=None): source coordinates use
  1/sf instead of in/out; torch's output size would be floor(in * sf).
  """
  m = _interpolation_matrix64(in_size, out_size, method, antialias, scale_factor).astype(np.float32)
  m.flags.writeable = False  # cached
  return m


# Named resize methods: (kernel, antialias, scale_factor offset o), o meaning
# scale_factor = (out + o) / in per axis.
_RESIZE_SPECS = {
    # torch's default bicubic: SegViT / mmseg, HF Dinov2Model.
    "bicubic": ("bicubic", False, None),
    # timm resample_abs_pos_embed, HF Dinov2WithRegisters, DINOv2 register models.
    "bicubic_antialias": ("bicubic", True, None),
    # Original DINOv2 non-register models: the "+ 0.1" scale_factor kludge.
    "bicubic_dinov2": ("bicubic", False, 0.1),
    "bilinear": ("bilinear", False, None),
}
RESIZE_METHODS = tuple(_RESIZE_SPECS)


def _resize_spec(method: str) -> tuple[str, bool, float | None]:
  if method not in _RESIZE_SPECS:
    raise ValueError(f"unknown resize method {method!r}; expected one of {RESIZE_METHODS}")
  return _RESIZE_SPECS[method]


def resize_matrix(in_size: int, out_size: int, method: str = "bicubic") -> np.ndarray:
  """Float64 (out_size, in_size) matrix of a named method of RESIZE_METHODS along one axis."""
  kernel, antialias, offset = _resize_spec(method)
  scale_factor = None if offset is None else (out_size + offset) / in_size
  return _interpolation_matrix64(in_size, out_size, kernel, antialias, scale_factor)


def is_static(size) -> bool:
  """Whether a dimension is a concrete integer (not a `jax.export` symbolic dimension)."""
  return isinstance(size, (int, np.integer))


def _filter_jnp(x: jax.Array, method: str) -> jax.Array:  # `_aa_filter` in jnp
  x = jnp.abs(x)
  if method == "bicubic":
    return jnp.where(x < 1, _cubic_near(x, -0.5), jnp.where(x < 2, _cubic_far(x, -0.5), 0.0))
  return jnp.maximum(1.0 - x, 0.0)


def symbolic_resize_matrix(in_size, out_size, method: str = "bicubic") -> jax.Array:
  """`resize_matrix` for sizes that may be symbolic (`jax.export` shape polymorphism): the
  same (out_size, in_size) matrix built in float32 jnp from `jnp.arange` of the sizes, each
  entry as a sum of one-hot taps (the numpy path's `np.add.at`). Only `resize_grid` on a
  symbolic size uses it; the numbers differ from `resize_matrix`'s (float64, then float32) by
  float32 rounding of the source coordinates (tests/models/test_layers.py measures it)."""
  kernel, antialias, offset = _resize_spec(method)
  f32 = jnp.float32
  n_in = jnp.asarray(in_size, f32)
  n_out = jnp.asarray(out_size, f32)
  rows = jnp.arange(out_size, dtype=f32)[:, None]  # (out, 1)
  cols = jnp.arange(in_size, dtype=jnp.int32)[None, :]  # (1, in)
  scale = n_in / n_out if offset is None else n_in / (n_out + offset)
  if antialias:  # `_interpolation_matrix64`'s loop, all rows at once
    support = (2.0 if kernel == "bicubic" else 1.0) * jnp.maximum(scale, 1.0)
    invscale = jnp.where(scale >= 1.0, 1.0 / scale, 1.0)
    max_taps = jnp.ceil(support).astype(jnp.int32) * 2 + 1
    center = scale * (rows + 0.5)
    lo = jnp.maximum(jnp.trunc(center - support + 0.5).astype(jnp.int32), 0)
    hi = jnp.minimum(jnp.trunc(center + support + 0.5).astype(jnp.int32), in_size)
    n = jnp.minimum(jnp.maximum(hi - lo, 0), max_taps)
    inside = (cols >= lo) & (cols < lo + n)
    w = jnp.where(inside, _filter_jnp((cols.astype(f32) - center + 0.5) * invscale, kernel), 0.0)
    total = w.sum(axis=1, keepdims=True)
    m = jnp.where(total != 0.0, w / jnp.where(total != 0.0, total, 1.0), w)
  elif kernel == "bicubic":
    src = (rows + 0.5) * scale - 0.5
    base = jnp.minimum(jnp.floor(src), n_in - 1)
    t = jnp.clip(src - base, 0.0, 1.0)
    taps = (_cubic_far(t + 1, -0.75), _cubic_near(t, -0.75), _cubic_near(1 - t, -0.75),
            _cubic_far(2 - t, -0.75))
    m = sum(jnp.where(cols == jnp.clip(base.astype(jnp.int32) - 1 + k, 0, in_size - 1), w, 0.0)
            for k, w in enumerate(taps))
  else:
    src = jnp.maximum((rows + 0.5) * scale - 0.5, 0.0)
    lo = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
    hi = jnp.minimum(lo + 1, in_size - 1)
    frac = jnp.clip(src - lo.astype(f32), 0.0, 1.0)
    m = jnp.where(cols == lo, 1.0 - frac, 0.0) + jnp.where(cols == hi, frac, 0.0)
  return m.astype(f32)


RESIZE_SCOPE = "resize"


def resize_grid(x: jax.Array, size: tuple[int, int], method: str = "bicubic",
                axes: tuple[int, int] = (1, 2)) -> jax.Array:
  """Separable resize of two spatial axes of `x` (default (B, H, W, D) layout) to `size` by a
  named method of RESIZE_METHODS, identical to the corresponding torch F.interpolate call.
  Returns `x` itself when the size is unchanged (as DINOv2 does for "bicubic_dinov2")."""
  _resize_spec(method)  # unknown names fail even when nothing is resized
  ha, wa = axes
  if (x.shape[ha], x.shape[wa]) == tuple(size):
    return x
  mh, mw = (jnp.asarray(resize_matrix(n, m, method), x.dtype) if is_static(n) and is_static(m)
            else symbolic_resize_matrix(n, m, method).astype(x.dtype)
            for n, m in ((x.shape[ha], size[0]), (x.shape[wa], size[1])))
  with jax.named_scope(RESIZE_SCOPE):  # the FLOP counter reports interpolation apart
    x = jnp.moveaxis(jnp.tensordot(mh, x, axes=((1,), (ha,)), precision="highest"), 0, ha)
    x = jnp.moveaxis(jnp.tensordot(mw, x, axes=((1,), (wa,)), precision="highest"), 0, wa)
  return x


def resize_posemb(posemb: jax.Array, new_grid: tuple[int, int],
                  method: str = "bicubic") -> jax.Array:
  """Resizes a (1, gh, gw, D) position embedding to (1, *new_grid, D); see resize_grid."""
  return resize_grid(posemb, new_grid, method, axes=(1, 2))


def resample_patch_kernel(kernel, new_patch: tuple[int, int],
                          method: str = "bicubic_antialias") -> np.ndarray:
  """FlexiViT PI-resize (Beyer et al. 2023) of a (ph, pw, Cin, D) patch-embedding kernel.

  With R the (nh*nw, ph*pw) matrix resizing a flattened patch to `new_patch` by `method`,
  returns pinv(R^T) @ kernel (float64, cast back to the input dtype): when upsampling,
  <resize(x), new_kernel> == <x, kernel> for every patch x; otherwise the least-squares
  solution. Same recipe as timm's resample_patch_embed (its default is bicubic + antialias).
  """
  kernel = np.asarray(kernel)
  ph, pw = kernel.shape[:2]
  nh, nw = new_patch
  if (ph, pw) == (nh, nw):
    return kernel
  r = np.kron(resize_matrix(ph, nh, method), resize_matrix(pw, nw, method))
  new = np.linalg.pinv(r.T) @ kernel.reshape(ph * pw, -1).astype(np.float64)
  return new.reshape(nh, nw, *kernel.shape[2:]).astype(kernel.dtype)


def upsample_masks(masks: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of (B, K, h, w) mask logits to (B, K, *size), torch-identical."""
  return resize_grid(masks, size, "bilinear", axes=(2, 3))


def semantic_scores(class_logits: jax.Array, mask_logits: jax.Array) -> jax.Array:
  """score[b, c, y, x] = sum_q softmax(class_logits[b, q])[c] * sigmoid(mask_logits[b, q, y, x]),
  the no-object column dropped. (B, Q, K + 1), (B, Q, H, W) -> (B, K, H, W)."""
  probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[..., :-1]
  return jnp.einsum("bqc,bqhw->bchw", probs, jax.nn.sigmoid(mask_logits.astype(jnp.float32)))
