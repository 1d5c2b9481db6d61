"""The DINOv3 ViT (`vit.Model("dinov3-...")`): parameter counts of the released sizes against
transformers' DINOv3ViTModel built with their real dimensions (on torch's meta device: no
weights allocated), the rotary embedding against transformers' DINOv3ViTRopePositionEmbedding
on non-square grids, its training-time coordinate augmentations (ranges, off at inference),
and scanned / rematerialised blocks against the unrolled stack with RoPE and its augmentation
on. Forward parity with transformers and the converters: tests/convert/test_dinov3.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P

from segvit_jax import sharding
from segvit_jax.models import layers, vit

# transformers configs of the released checkpoints (facebook/dinov3-vit*-pretrain-lvd1689m;
# the sizes of the facebookresearch/dinov3 release's hub/backbones.py), and their parameter
# count in our ViT. Ours has no `mask_token` (masked-image pre-training only): HF's count
# less the width. The release's README: S 21M, S+ 29M, B 86M, L 300M, H+ 840M, 7B 6,716M (L+,
# in hub/backbones.py, is not in its table).
_GATED = dict(use_gated_mlp=True, hidden_act="silu")
RELEASED = {
    "S": (dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
               intermediate_size=1536), 21_596_160),
    "S+": (dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                intermediate_size=1536, **_GATED), 28_692_480),
    "B": (dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072), 85_659_648),
    "L": (dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
               intermediate_size=4096), 303_128_576),
    "L+": (dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                intermediate_size=4096, **_GATED), 403_890_176),
    "H+": (dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20,
                intermediate_size=5120, **_GATED), 840_591_360),
    "7B": (dict(hidden_size=4096, num_hidden_layers=40, num_attention_heads=32,
                intermediate_size=8192, query_bias=False, value_bias=False, **_GATED),
           6_716_030_976),
}


def _our_count(variant: str) -> int:
  """Parameters of `vit.Model(variant)`, abstractly (scanned: one block to trace, the same
  parameters stacked)."""
  model = vit.Model(variant, scan_layers=True)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


@pytest.mark.parametrize("size", list(RELEASED))
def test_parameter_counts_equal_transformers(size):
  hf_fields, want = RELEASED[size]
  config = transformers.DINOv3ViTConfig(patch_size=16, num_register_tokens=4, **hf_fields)
  with torch.device("meta"):
    hf = transformers.DINOv3ViTModel(config)
  hf_count = sum(p.numel() for n, p in hf.named_parameters() if n != "embeddings.mask_token")
  fields = vit.decode_variant(f"dinov3-{size}/16")
  assert (fields["width"], fields["depth"], fields["num_heads"], fields["mlp_dim"]) == (
      hf_fields["hidden_size"], hf_fields["num_hidden_layers"],
      hf_fields["num_attention_heads"], hf_fields["intermediate_size"])
  assert _our_count(f"dinov3-{size}/16") == hf_count == want


def test_variant_names():
  f = vit.decode_variant("dinov3-7B/16")
  assert (f["ffn"], f["qkv_bias"], f["key_bias"], f["num_registers"], f["rope_theta"],
          f["rope_rescale"], f["norm_eps"], f["layerscale"]) == (
              "swiglu", False, False, 4, 100.0, 2.0, 1e-5, 1e-5)
  assert vit.decode_variant("dinov3-B/16").get("ffn", "mlp") == "mlp"
  with pytest.raises(ValueError, match=r"unknown ViT variant 'dinov3-g/16'.*dinov3-SIZE/PATCH "
                                       r"with SIZE in \['S', 'S\+', 'B', 'L', 'L\+', 'H\+', "
                                       r"'7B'\]"):
    vit.decode_variant("dinov3-g/16")
  with pytest.raises(ValueError, match="unknown ViT variant 'H\\+/16'"):
    vit.decode_variant("H+/16")


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (7, 2)])
def test_rope_matches_transformers(grid):
  head_dim, theta = 16, 100.0
  config = transformers.DINOv3ViTConfig(hidden_size=4 * head_dim, num_attention_heads=4,
                                        patch_size=16, rope_theta=theta)
  rope = transformers.models.dinov3_vit.modeling_dinov3_vit.DINOv3ViTRopePositionEmbedding(
      config).eval()
  cos, sin = rope(torch.zeros(1, 3, 16 * grid[0], 16 * grid[1]))
  got_sin, got_cos = layers.rope_sin_cos(layers.rope_coords(grid), head_dim, theta)
  # float32 both: theirs multiplies by 1 / period, ours divides (the release's form).
  assert max(float(np.max(np.abs(np.asarray(got_sin) - sin.numpy()))),
             float(np.max(np.abs(np.asarray(got_cos) - cos.numpy())))) < 1e-6


def test_rope_coordinate_augmentations():
  """shift adds one offset per axis in [-s, s], jitter multiplies each axis by one factor in
  [1/j, j], rescale both axes by one factor in [1/r, r]; each a fresh draw per key."""
  base = jnp.asarray(layers.rope_coords((2, 4)))  # no zero coordinate to divide by
  for k in range(20):
    key = jax.random.key(k)
    shifted = layers.rope_augment(base, key, shift=0.3) - base
    assert np.allclose(shifted, shifted[:1], atol=1e-6) and np.all(np.abs(shifted) <= 0.3)
    jittered = layers.rope_augment(base, key, jitter=1.5) / base
    assert np.allclose(jittered, jittered[:1], atol=1e-5)
    assert np.all((jittered >= 1 / 1.5 - 1e-6) & (jittered <= 1.5 + 1e-6))
    rescaled = layers.rope_augment(base, key, rescale=2.0) / base
    assert np.allclose(rescaled, rescaled[0, 0], atol=1e-5)
    assert 0.5 - 1e-6 <= float(rescaled[0, 0]) <= 2.0 + 1e-6
  factors = [float((layers.rope_augment(base, jax.random.key(k), rescale=2.0) / base)[0, 0])
             for k in range(50)]
  assert min(factors) < 0.8 and max(factors) > 1.25  # log-uniform over [1/2, 2]
  assert np.array_equal(layers.rope_augment(base, jax.random.key(0)), base)  # all None


# LayerScale 1 (not the 1e-5 of a fresh DINOv3) so that attention, hence RoPE, shows.
TINY = dict(width=32, depth=3, mlp_dim=48, num_heads=2, patch_size=4, drop_path=0.5,
            layerscale=1.0)


def test_augmentation_only_in_training_and_scan_remat_match_unrolled():
  unrolled = vit.Model("dinov3-S/16", **TINY, ffn="swiglu")
  images = jax.random.normal(jax.random.key(1), (2, 12, 20, 3))
  params = nn.meta.unbox(jax.jit(unrolled.init)(jax.random.key(0), images)["params"])
  assert "pos_embedding" not in params and "bias" not in params["encoderblock_0"]["attn"]["key"]
  assert unrolled.rope_rescale == 2.0

  def run(model, p, train, seed):
    return model.apply({"params": p}, images, train=train,
                       rngs={"dropout": jax.random.key(seed)} if train else None)

  plain = vit.Model("dinov3-S/16", **TINY, ffn="swiglu", rope_rescale=None)
  # Inference: no augmentation (and no drop path); the rescale option changes nothing.
  assert np.array_equal(run(unrolled, params, False, 0)[0], run(plain, params, False, 0)[0])
  # Training: with drop path off, the only randomness is the coordinate rescale.
  no_drop = dict(TINY, drop_path=0.0)
  aug = vit.Model("dinov3-S/16", **no_drop, ffn="swiglu")
  fixed = vit.Model("dinov3-S/16", **no_drop, ffn="swiglu", rope_rescale=None)
  assert np.array_equal(run(fixed, params, True, 0)[0], run(plain, params, False, 0)[0])
  a, b = run(aug, params, True, 0)[0], run(aug, params, True, 1)[0]
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3
  assert np.array_equal(a, run(aug, params, True, 0)[0])

  stacked = vit.stack_blocks(params)
  want = run(unrolled, params, True, 3)
  for remat in (False, True):
    scanned = vit.Model("dinov3-S/16", **TINY, ffn="swiglu", scan_layers=True, remat=remat)
    got = run(scanned, stacked, True, 3)
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(
        jax.tree.leaves(got), jax.tree.leaves(want)))
    assert diff < 1e-5, (remat, diff)  # same rotary draw, same drop-path masks


def test_dinov3_params_shard_like_other_vits():
  model = vit.Model("dinov3-S/16", **TINY, scan_layers=True)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  sh = sharding.logical_shardings(boxed["params"], mesh, sharding.LOGICAL_RULES)
  attn = sh["encoderblock"]["attn"]
  assert attn["key"]["kernel"].spec == P(None, "fsdp", "tensor") and "bias" not in attn["key"]
  assert attn["query"]["bias"].spec == P(None, "tensor")
  assert sh["encoderblock"]["ls1"].spec == P(None, "fsdp")
  assert sh["registers"].spec == P(None, None, "fsdp")
