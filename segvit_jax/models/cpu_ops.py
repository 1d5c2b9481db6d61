"""Convolutions rewritten as products, for XLA on the CPU.

XLA's CPU kernels for 1x1 convolutions, for grouped (depthwise) convolutions and for the
kernel gradient of a transposed convolution are many times slower than the equivalent matrix
products, shifted elementwise products or elementwise sums; on these shapes they made SegFormer
and EoMT slower than PyTorch on the same machine. Each module here computes the same function
as the `nn.Conv` / `nn.ConvTranspose` it replaces and keeps its parameters (names, shapes,
meaning), so checkpoints do not see a difference; on accelerators the two forms compile to
similar fused code. The measurements are in BENCHMARKS.md ("Inference" and "Training step").

  PointwiseConv       1x1 convolution as a matrix product (SegFormer's decoder).
  PatchConvTranspose  k x k stride-k transposed convolution as a product and a depth-to-space
                      (EoMT's up-scaling blocks).
  DepthwiseConv       depthwise convolution as shifted per-channel products
                      (`depthwise_conv`, whose gradient is written out; SegFormer's Mix-FFN,
                      EoMT), under the name scope DEPTHWISE_SCOPE for the FLOP counter.
  sum_rows            a sum over the leading axis by pairwise halving (the depthwise kernel
                      gradient).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segvit_jax.models.layers import Initializer


class PointwiseConv(nn.Module):
  """A 1x1 convolution on (B, H, W, C) computed as a matrix product, with the parameters of
  `nn.Conv(features, (1, 1))` (`kernel` (1, 1, C, features), `bias`)."""

  features: int
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features))
    y = jnp.einsum("bhwc,cf->bhwf", x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(self.dtype)
    return y


class PatchConvTranspose(nn.Module):
  """A transposed convolution whose kernel equals its stride, k x k (torch's
  ConvTranspose2d(C, F, k, stride=k)), on (B, h, w, C) -> (B, k h, k w, F): every input pixel
  becomes its own k x k output patch, a matrix product and a depth-to-space. The parameters
  and their meaning are those of `nn.ConvTranspose(F, (k, k), strides=(k, k),
  padding="VALID")` (`kernel` (k, k, C, F), unflipped: output offset (a, c) in a patch uses
  `kernel[k - 1 - a, k - 1 - c]`; `bias` (F,)). XLA computes the convolution's kernel gradient
  on the CPU as an input-dilated convolution; the product's gradient is two more products."""

  features: int
  kernel_size: int = 2
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, f = self.kernel_size, self.features
    b, h, w, c = x.shape
    kernel = self.param("kernel", self.kernel_init, (k, k, c, f)).astype(self.dtype)
    y = jnp.einsum("bhwc,xycf->bhxwyf", x.astype(self.dtype), kernel[::-1, ::-1])
    y = y.reshape(b, h * k, w * k, f)  # depth-to-space: row h k + x, column w k + y
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (f,)).astype(self.dtype)
    return y


DEPTHWISE_SCOPE = "depthwise_conv"


def _shifted_sum(x: jax.Array, kernel: jax.Array, before: int) -> jax.Array:
  """sum_ij pad(x)[:, i:i + H, j:j + W] * kernel[i, j]: (B, H, W, C), (k, k, C), padding
  `before` zeros above / left and k - 1 - before below / right."""
  k, h, w = kernel.shape[0], x.shape[1], x.shape[2]
  xp = jnp.pad(x, ((0, 0), (before, k - 1 - before), (before, k - 1 - before), (0, 0)))
  return sum(xp[:, i:i + h, j:j + w, :] * kernel[i, j] for i in range(k) for j in range(k))


@jax.custom_vjp
def depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """torch's Conv2d(C, C, k, padding=k // 2, groups=C, bias=False) of (B, H, W, C) `x` with a
  (k, k, C) kernel, as k * k shifted, per-channel-scaled copies. The gradient is written out:
  for x the same sum over the output gradient with the kernel flipped, for the kernel k * k
  products summed by `sum_rows`. Differentiating the slices instead would pad each tap's
  gradient to a full-size buffer."""
  return _shifted_sum(x, kernel, kernel.shape[0] // 2)


def _depthwise_fwd(x, kernel):
  return depthwise_conv(x, kernel), (x, kernel)


def sum_rows(x: jax.Array, rows: int = 64) -> jax.Array:
  """sum(x, axis=0) of (N, C) `x` by pairwise halving: elementwise adds of the two halves down
  to `rows` rows, then one small reduction. XLA's CPU reduction over a major axis runs as a
  scalar loop."""
  n = x.shape[0]
  while n > rows:
    if n % 2:
      x = jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])
      n += 1
    x = x[:n // 2] + x[n // 2:]
    n //= 2
  return jnp.sum(x, axis=0)


def _depthwise_bwd(res, g):
  x, kernel = res
  k, h, w, c = kernel.shape[0], x.shape[1], x.shape[2], x.shape[3]
  p = k // 2
  dx = _shifted_sum(g.astype(x.dtype), kernel[::-1, ::-1], k - 1 - p)
  xp = jnp.pad(x, ((0, 0), (p, k - 1 - p), (p, k - 1 - p), (0, 0)))
  g32 = g.astype(jnp.float32)
  dk = jnp.stack([jnp.stack([sum_rows((xp[:, i:i + h, j:j + w, :] * g32).reshape(-1, c))
                             for j in range(k)]) for i in range(k)])
  return dx, dk.astype(kernel.dtype)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nn.Module):
  """Depthwise k x k convolution, stride 1, zero padding k // 2 (torch's Conv2d(C, C, k,
  padding=k // 2, groups=C)) on (B, H, W, C), as `depthwise_conv`'s sum of k * k shifted,
  per-channel-scaled copies of the input. The parameters are those of `nn.Conv(C, (k, k),
  feature_group_count=C)` (`kernel` (k, k, 1, C), `bias` (C,))."""

  kernel_size: int = 3
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, c = self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (k, k, 1, c)).astype(self.dtype)
    with jax.named_scope(DEPTHWISE_SCOPE):  # the FLOP counter counts these products as MACs
      out = depthwise_conv(x.astype(self.dtype), kernel[:, :, 0])
    if self.use_bias:
      out = out + self.param("bias", self.bias_init, (c,)).astype(self.dtype)
    return out
