"""The SegViT optimizer recipe: mmcv poly + linear warm-up values, decoder lr x10, no weight
decay on backbone LayerNorms, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from segvit_jax import optim


def test_warmup_poly_matches_mmcv_formula():
  sched = optim.warmup_poly_schedule(2e-5, 160_000, 1500, 1e-6, 1.0, 0.0)
  # Hand values from mmcv's PolyLrUpdaterHook + linear warm-up.
  def mmcv(it):
    regular = 2e-5 * (1 - it / 160_000) ** 1.0
    if it < 1500:
      return regular * (1 - (1 - it / 1500) * (1 - 1e-6))
    return regular
  for it in (0, 1, 750, 1499, 1500, 80_000, 159_999, 160_000):
    np.testing.assert_allclose(float(sched(it)), mmcv(it), rtol=1e-5, atol=1e-15)
  sched2 = optim.warmup_poly_schedule(1.0, 100, 0, 1e-6, power=2.0, min_lr=0.1)
  np.testing.assert_allclose(float(sched2(50)), 0.9 * 0.25 + 0.1, rtol=1e-6)


def test_lr_multiplier_and_decay_mask():
  params = {
      "backbone": {"encoderblock_0": {"norm1": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
                                      "mlp": {"fc1": {"kernel": jnp.ones((4, 4))}}}},
      "head": {"proj_norm_0": {"scale": jnp.ones(4)},
               "class_embed": {"kernel": jnp.ones((4, 4))}},
  }
  cfg = common.run_config().optim
  cfg.clip_norm = 0.0
  cfg.warmup_steps = 0
  cfg.lr = 1e-3
  cfg.weight_decay = 0.5
  tx, _ = optim.make_optimizer(cfg, total_steps=10, params=params)
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, state, params)
  # Zero gradients: the update is -lr * mult * wd * p where decay applies, else 0.
  b, h = updates["backbone"]["encoderblock_0"], updates["head"]
  np.testing.assert_allclose(b["norm1"]["scale"], 0.0)
  np.testing.assert_allclose(b["mlp"]["fc1"]["kernel"], -1e-3 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(h["class_embed"]["kernel"], -1e-2 * 0.5, rtol=1e-6)
  # Head norms are decayed (mmseg custom_keys order makes 'head' win over 'norm').
  np.testing.assert_allclose(h["proj_norm_0"]["scale"], -1e-2 * 0.5, rtol=1e-6)


def test_clip_by_global_norm():
  params = {"backbone": {"w": jnp.zeros(2)}, "head": {"w": jnp.zeros(2)}}
  cfg = common.run_config().optim
  cfg.update(clip_norm=1.0, warmup_steps=0, weight_decay=0.0, lr=1.0, b1=0.0, b2=0.0,
             eps=0.0, lr_mults={})
  tx, _ = optim.make_optimizer(cfg, 10, params)
  grads = {"backbone": {"w": jnp.array([30.0, 40.0])}, "head": {"w": jnp.zeros(2)}}
  clipped = optax.clip_by_global_norm(1.0).update(grads, None)[0]
  np.testing.assert_allclose(clipped["backbone"]["w"], [0.6, 0.8], rtol=1e-6)
  updates, _ = tx.update(grads, tx.init(params), params)
  # b1 = b2 = 0, eps = 0: adam's direction is sign(g); lr 1 at step 0 of 10.
  np.testing.assert_allclose(updates["backbone"]["w"], [-1.0, -1.0], rtol=1e-5)


def release_two_stage(base, step, w1, w2, total, power, backbone):
  """EoMT's TwoStageWarmupPolySchedule.get_lr, transcribed from its definition."""
  if not backbone:
    if w1 > 0 and step < w1:
      return base * step / w1
    return base * (1 - max(0, step - w1) / max(1, total - w1)) ** power
  if step < w1:
    return 0.0
  if step < w1 + w2:
    return base * (step - w1) / w2
  return base * (1 - max(0, step - w1 - w2) / max(1, total - w1 - w2)) ** power


def test_two_stage_schedule_matches_the_release():
  new, backbone = optim.two_stage_schedules(1e-4, 20_000, 500, 1000, 0.9)
  for t in (0, 1, 250, 499, 500, 501, 1000, 1499, 1500, 1501, 10_000, 19_999, 20_000):
    np.testing.assert_allclose(float(new(t)), release_two_stage(1e-4, t, 500, 1000, 20_000,
                                                                0.9, False), rtol=1e-5,
                               atol=1e-12, err_msg=str(t))
    np.testing.assert_allclose(float(backbone(t)), release_two_stage(1e-4, t, 500, 1000,
                                                                     20_000, 0.9, True),
                               rtol=1e-5, atol=1e-12, err_msg=str(t))


def test_layer_decay_and_two_stage_learning_rates_per_parameter():
  # A 3-block ViT backbone + a head. Zero gradients, weight decay 1: each update is
  # -lr(step) * factor * p, so the updates read the per-parameter learning rates.
  ones = lambda *s: jnp.ones(s)  # noqa: E731
  params = {
      "backbone": {"embedding": {"kernel": ones(2)}, "pos_embedding": ones(2),
                   "cls": ones(2), "registers": ones(2),
                   **{f"encoderblock_{i}": {"attn": {"query": {"kernel": ones(2)}}}
                      for i in range(3)},
                   "encoder_norm": {"scale": ones(2)}},
      "head": {"queries": ones(2)},
  }
  cfg = common.run_config().optim
  cfg.update(schedule="two_stage", lr=1e-4, warmup_steps=2, backbone_warmup_steps=4,
             poly_power=0.9, weight_decay=1.0, no_decay=(), clip_norm=0.0, layer_decay=0.8)
  cfg.lr_mults = {}  # (update() would merge into the decoder's x10)
  tx, schedule = optim.make_optimizer(cfg, total_steps=100, params=params)
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  lrs = []
  for _ in range(8):
    updates, state = tx.update(zero, state, params)
    lrs.append(jax.tree.map(lambda u: -float(u[0]), updates))
  head = [lr["head"]["queries"] for lr in lrs]
  np.testing.assert_allclose(head, [release_two_stage(1e-4, t, 2, 4, 100, 0.9, False)
                                    for t in range(8)], rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose([float(schedule(t)) for t in range(8)], head, rtol=1e-6)
  factors = {"encoderblock_2": 1.0, "encoderblock_1": 0.8, "encoderblock_0": 0.64,
             "embedding": 0.64, "pos_embedding": 0.64, "cls": 0.64, "registers": 0.64,
             "encoder_norm": 1.0}
  for name, f in factors.items():
    got = [jax.tree.leaves(lr["backbone"][name])[0] for lr in lrs]
    want = [f * release_two_stage(1e-4, t, 2, 4, 100, 0.9, True) for t in range(8)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12, err_msg=name)
  assert lrs[1]["backbone"]["cls"] == 0.0 and lrs[3]["backbone"]["cls"] > 0.0


def release_llrd_factors(depth, l2, llrd, llrd_l2_enabled, names):
  """The EoMT release's LightningModule.configure_optimizers lr factors of backbone parameter
  names (timm / transformers order: embeddings, blocks.i..., norm), transcribed: reversed
  order, the block index carried to the parameters after the blocks, the final norm at 1, the
  L2 blocks at 1 unless llrd_l2_enabled."""
  factors, block_i = {}, depth
  l2_blocks = list(range(depth - l2, depth))
  for name in reversed(names):
    lr = 1.0
    parts = name.split(".")
    is_block = parts[0] == "blocks"
    if is_block:
      block_i = int(parts[1])
    if is_block or block_i == 0:
      lr *= llrd ** (depth - 1 - block_i)
    if name.startswith("norm"):
      lr = 1.0
    if is_block and block_i in l2_blocks and not llrd_l2_enabled:
      lr = 1.0
    factors[name] = lr
  return factors


def test_layer_decay_skip_last_keeps_the_query_blocks_at_the_full_lr():
  """EoMT-DINOv3's recipe (`llrd_l2_enabled: False`): 6 blocks, the last 2 undecayed, the
  others and the embeddings as without the option; equal to the release's rule."""
  ones = lambda *s: jnp.ones(s)  # noqa: E731
  depth, l2 = 6, 2
  params = {"backbone": {"embedding": {"kernel": ones(2)}, "cls": ones(2),
                         "registers": ones(2),
                         **{f"encoderblock_{i}": {"attn": {"query": {"kernel": ones(2)}}}
                            for i in range(depth)},
                         "encoder_norm": {"scale": ones(2)}},
            "head": {"queries": ones(2)}}
  ours = {skip: optim.lr_factors(params, {}, 0.8, skip) for skip in (0, l2)}
  names = ["embed.cls", *(f"blocks.{i}.attn" for i in range(depth)), "norm.weight"]
  for skip, enabled in ((0, True), (l2, False)):
    release = release_llrd_factors(depth, l2, 0.8, enabled, names)
    got = ours[skip]["backbone"]
    assert got["cls"] == got["embedding"]["kernel"] == release["embed.cls"] == 0.8**5
    assert got["encoder_norm"]["scale"] == release["norm.weight"] == 1.0
    for i in range(depth):
      assert got[f"encoderblock_{i}"]["attn"]["query"]["kernel"] == pytest.approx(
          release[f"blocks.{i}.attn"], rel=1e-12), (skip, i)
    assert ours[skip]["head"]["queries"] == 1.0
  assert [ours[l2]["backbone"][f"encoderblock_{i}"]["attn"]["query"]["kernel"]
          for i in range(depth)] == pytest.approx([0.8**5, 0.8**4, 0.8**3, 0.8**2, 1.0, 1.0])
  # Through make_optimizer (config.optim.layer_decay_skip_last): the updates read the rates.
  cfg = common.run_config().optim
  cfg.update(schedule="two_stage", lr=1e-4, warmup_steps=0, backbone_warmup_steps=0,
             poly_power=1.0, weight_decay=1.0, no_decay=(), clip_norm=0.0, layer_decay=0.8,
             layer_decay_skip_last=l2)
  cfg.lr_mults = {}
  tx, _ = optim.make_optimizer(cfg, total_steps=100, params=params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  rates = jax.tree.map(lambda u: -float(u[0]) / 1e-4, updates)  # step 0: lr 1e-4 x factor
  np.testing.assert_allclose(jax.tree.leaves(rates), jax.tree.leaves(ours[l2]), rtol=1e-6)
  cfg.layer_decay_skip_last = depth + 1
  with pytest.raises(ValueError, match=r"config.optim.layer_decay_skip_last=7: expected 0 to "
                                       r"the backbone's 6 blocks"):
    optim.make_optimizer(cfg, total_steps=100, params=params)
