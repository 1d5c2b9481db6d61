"""Building blocks shared by every model family: one attention, one MLP, drop path, one
position-embedding resize.

Logical axis names (mapped to mesh axes by `segvit_jax.sharding`):
  parameters: `embed` (model width), `mlp` (hidden width), `heads` (attention width,
              heads contiguous),
              `classes`, `queries`;
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


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example (scaled by 1 / keep)."""

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


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


class Attention(nn.Module):
  """Multi-head attention with separate query/key/value projections.

  With `return_logits`, also returns the pre-softmax logits `(q k^T) * head_dim^-0.5` averaged
  over heads, (B, Nq, Nk): SegViT's Attention-to-Mask reads its masks from them (spec segvit.md,
  ATM head, item 5).
  """

  num_heads: int
  dropout: float = 0.0  # on the attention probabilities
  return_logits: bool = False
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_q: jax.Array, x_kv: jax.Array | None = None,
               deterministic: bool = True):
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
    q = split(proj(name="query")(x_q))  # (B, Nq, H, hd)
    k = split(proj(name="key")(x_kv))
    v = split(proj(name="value")(x_kv))
    q = constrain(q, ("act_batch", "act_len", "act_heads", None))

    need_probs = self.return_logits or (self.dropout > 0.0 and not deterministic)
    if need_probs:
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
      probs = nn.Dropout(self.dropout)(probs, deterministic)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    else:
      out = jax.nn.dot_product_attention(q, k, v)

    out = nn.Dense(d, dtype=self.dtype, name="out",
                   kernel_init=logical(self.kernel_init, ("heads", "embed")),
                   bias_init=logical(self.bias_init, ("embed",)))(out.reshape(*out.shape[:-2], d))
    if self.return_logits:
      return out, logits.mean(axis=1)
    return out


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
  """Keys cubic-convolution weights for taps at offsets -1, 0, 1, 2 from floor(x)."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=256)
def interpolation_matrix(in_size: int, out_size: int, method: str = "bicubic") -> np.ndarray:
  """(out_size, in_size) matrix M with `out = M @ in`, matching torch's F.interpolate with
  align_corners=False and no antialiasing ('bicubic' uses A = -0.75 and clamped borders, as
  torch does; 'bilinear' likewise clamps at the borders)."""
  scale = in_size / out_size
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  if method == "bicubic":
    base = np.floor(src)
    w = _cubic_weights(src - base, -0.75)
    for tap in range(4):
      idx = np.clip(base.astype(int) - 1 + tap, 0, in_size - 1)
      np.add.at(m, (rows, idx), w[:, tap])
  elif method == "bilinear":
    src = np.maximum(src, 0.0)
    lo = np.minimum(np.floor(src).astype(int), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
  else:
    raise ValueError(f"unknown interpolation method {method!r}; expected 'bicubic' or 'bilinear'")
  return m.astype(np.float32)


def resize_grid(x: jax.Array, size: tuple[int, int], method: str = "bicubic",
                axes: tuple[int, int] = (1, 2)) -> jax.Array:
  """Separable resize of two spatial axes of `x` (default (B, H, W, D) layout) to `size`,
  identical to torch F.interpolate(align_corners=False, antialias=False)."""
  ha, wa = axes
  if (x.shape[ha], x.shape[wa]) == tuple(size):
    return x
  mh = jnp.asarray(interpolation_matrix(x.shape[ha], size[0], method), x.dtype)
  mw = jnp.asarray(interpolation_matrix(x.shape[wa], size[1], method), x.dtype)
  x = jnp.moveaxis(jnp.tensordot(mh, x, axes=((1,), (ha,)), precision="highest"), 0, ha)
  x = jnp.moveaxis(jnp.tensordot(mw, x, axes=((1,), (wa,)), precision="highest"), 0, wa)
  return x


def resize_posemb(posemb: jax.Array, new_grid: tuple[int, int],
                  method: str = "bicubic") -> jax.Array:
  """Resizes a (1, gh, gw, D) position embedding to (1, *new_grid, D)."""
  return resize_grid(posemb, new_grid, method, axes=(1, 2))


def upsample_masks(masks: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of (B, K, h, w) mask logits to (B, K, *size), torch-identical."""
  return resize_grid(masks, size, "bilinear", axes=(2, 3))
