"""Layers with a hand-written computation checked against the library op they replace."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segvit_jax.models import cpu_ops


@pytest.mark.parametrize("k,bias", [(3, True), (3, False), (5, True)])
def test_depthwise_conv_equals_grouped_conv(k, bias):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 13, 6)), jnp.float32)
  ours = cpu_ops.DepthwiseConv(k, use_bias=bias,
                               bias_init=nn.initializers.normal(1.0))
  variables = ours.init(jax.random.key(1), x)
  grouped = nn.Conv(6, (k, k), padding=((k // 2, k // 2),) * 2, feature_group_count=6,
                    use_bias=bias)
  # Same parameter names and shapes: checkpoints of either load into the other.
  assert jax.tree.map(np.shape, variables) == jax.tree.map(
      np.shape, grouped.init(jax.random.key(1), x))
  want = jax.lax.conv_general_dilated(
      x, variables["params"]["kernel"], (1, 1), ((k // 2, k // 2),) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=6,
      precision="highest") + (variables["params"]["bias"] if bias else 0.0)
  np.testing.assert_allclose(ours.apply(variables, x), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [3, 5])
def test_depthwise_conv_gradient_equals_grouped_conv_gradient(k):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 7, 10, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, 4)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(2, 7, 10, 4)), jnp.float32)
  grouped = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
      x, w[:, :, None], (1, 1), ((k // 2, k // 2),) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4, precision="highest")
  want = jax.vjp(grouped, x, kernel)[1](g)
  got = jax.vjp(cpu_ops.depthwise_conv, x, kernel)[1](g)
  for a, b in zip(got, want):  # max abs diff of the x and kernel gradients
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


def test_pointwise_conv_equals_a_1x1_conv():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 7, 6)), jnp.float32)
  ours = cpu_ops.PointwiseConv(4, bias_init=nn.initializers.normal(1.0))
  variables = ours.init(jax.random.key(1), x)
  conv = nn.Conv(4, (1, 1))
  assert jax.tree.map(np.shape, variables) == jax.tree.map(
      np.shape, conv.init(jax.random.key(1), x))
  np.testing.assert_allclose(ours.apply(variables, x), conv.apply(variables, x), atol=1e-5,
                             rtol=0)


@pytest.mark.parametrize("k", [2, 3])
def test_patch_conv_transpose_equals_conv_transpose(k):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5, 6)), jnp.float32)
  ours = cpu_ops.PatchConvTranspose(4, k, bias_init=nn.initializers.normal(1.0))
  variables = ours.init(jax.random.key(1), x)
  conv = nn.ConvTranspose(4, (k, k), strides=(k, k), padding="VALID")
  assert jax.tree.map(np.shape, variables) == jax.tree.map(
      np.shape, conv.init(jax.random.key(1), x))
  np.testing.assert_allclose(ours.apply(variables, x), conv.apply(variables, x), atol=1e-5,
                             rtol=0)
  # The gradients too (ours differentiates a product, the library a dilated convolution).
  grad = lambda m: jax.grad(lambda v, x: jnp.sum(jnp.sin(m.apply(v, x))), (0, 1))(  # noqa: E731
      variables, x)
  for a, b in zip(jax.tree.leaves(grad(ours)), jax.tree.leaves(grad(conv))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
