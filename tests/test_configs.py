"""The paper configs, checked by shape (jax.eval_shape) and parameter count, never run."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, demo, segvit_vit_b16_ade20k, segvit_vit_l16_ade20k
from segvit_jax.models import build_model, vit


def param_counts(config):
  model = build_model(config.model)
  h, w = config.augment.crop_size
  params = nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, 3)))["params"]))
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))  # noqa: E731
  return count(params["backbone"]), count(params["head"])


def vit_count(width, depth, mlp, patch, grid):
  block = 4 * (width * width + width) + 2 * width * mlp + mlp + width + 4 * width
  return patch * patch * 3 * width + width + (1 + grid * grid) * width + width + depth * block


def atm_count(in_dim, width, stages, layers, k):
  layer = 2 * 4 * (width * width + width) + 2 * width * 4 * width + 4 * width + width + 6 * width
  return stages * (in_dim * width + width + 2 * width + layers * layer) + k * width + (
      width * (k + 1) + k + 1)


@pytest.mark.parametrize("module,variant,backbone,head", [
    (segvit_vit_b16_ade20k, "B/16", 86_433_024, 22_303_255),
    (segvit_vit_l16_ade20k, "L/16", 304_737_280, 39_568_023),
])
def test_paper_config_parameter_counts(module, variant, backbone, head):
  config = module.get_config()
  got = param_counts(config)
  assert got == (backbone, head)
  width, depth, mlp = {"B/16": (768, 12, 3072), "L/16": (1024, 24, 4096)}[variant]
  crop = config.augment.crop_size[0]
  assert backbone == vit_count(width, depth, mlp, 16, crop // 16)
  head_cfg = common.ATM_HEADS[variant]
  assert head == atm_count(width, head_cfg["width"], 3, 3, 150)


def test_paper_config_recipe_numbers():
  for module, crop, stride, taps, drop_path in (
      (segvit_vit_b16_ade20k, 512, 341, (5, 7, 11), 0.1),
      (segvit_vit_l16_ade20k, 640, 608, (7, 15, 23), 0.3)):
    c = module.get_config()
    assert c.augment.crop_size == (crop, crop) and c.eval.stride == (stride, stride)
    assert tuple(c.model.head.tap_layers) == taps
    assert c.model.backbone.drop_path == drop_path
    assert (c.optim.lr, c.optim.lr_mults["head"], c.optim.weight_decay) == (2e-5, 10.0, 0.01)
    assert (c.optim.warmup_steps, c.optim.clip_norm, c.batch_size) == (1500, 35.0, 16)
    assert (c.total_steps, c.dataset.name, c.dataset.num_classes) == (160_000, "ade20k", 150)
    assert c.mean == c.std == (127.5, 127.5, 127.5)


def test_l16_output_shapes_on_non_square_input():
  c = segvit_vit_l16_ade20k.get_config()
  model = build_model(c.model)
  x = jax.ShapeDtypeStruct((2, 640, 480, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  out = jax.eval_shape(model.apply, variables, x)
  assert out["class_logits"].shape == (2, 150, 151)
  assert out["mask_logits"].shape == (2, 150, 640, 480)
  assert out["semantic_scores"].shape == (2, 150, 640, 480)
  assert [a["mask_logits"].shape for a in out["aux_outputs"]] == [(2, 150, 40, 30)] * 2


def test_demo_configs_build():
  for arg in ("", "smoke"):
    c = demo.get_config(arg)
    assert c.batch_size % 2 == 0
    param_counts(c)
  with pytest.raises(ValueError, match="unknown demo config argument 'x'"):
    demo.get_config("x")


def dinov2_count(width, depth, mlp, registers, swiglu, grid=37, patch=14):
  ffn = 3 * width * mlp + 2 * mlp + width if swiglu else 2 * width * mlp + mlp + width
  block = 4 * width + 4 * (width * width + width) + 2 * width + ffn  # norms, attn, LayerScale
  embed = patch * patch * 3 * width + width + (1 + grid * grid) * width + (1 + registers) * width
  return embed + depth * block + 2 * width


@pytest.mark.parametrize("size,width,depth,mlp,paper_m", [
    ("S", 384, 12, 1536, 21), ("B", 768, 12, 3072, 86), ("L", 1024, 24, 4096, 300),
    ("g", 1536, 40, 4096, 1100),  # g: SwiGLU, hidden 2/3 * 6144 rounded to 8
])
@pytest.mark.parametrize("reg", ["", "-reg4"])
def test_dinov2_variant_parameter_counts(size, width, depth, mlp, paper_m, reg):
  """DINOv2 backbones at 518 px (37x37 grid) by variant name: the formula, and the paper's
  rounded sizes (Oquab et al. 2023: 21M / 86M / 300M / 1.1B; measured 22.06M / 86.58M /
  304.32M / 1136.48M, so the paper rounds S and g loosely) within 6%."""
  model = vit.Model(variant=f"dinov2-{size}/14{reg}")
  params = nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 518, 518, 3)))["params"]))
  got = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert got == dinov2_count(width, depth, mlp, 4 if reg else 0, size == "g")
  assert abs(got / (paper_m * 1e6) - 1) < 0.06, got
  assert model.ffn == ("swiglu" if size == "g" else "mlp")
  assert model.posemb_resize == ("bicubic_antialias" if reg else "bicubic_dinov2")


def test_variant_names():
  assert vit.decode_variant("augreg-B/16") == vit.decode_variant("B/16")
  with pytest.raises(ValueError, match=r"unknown ViT variant 'dinov3-B/16'"):
    vit.decode_variant("dinov3-B/16")
  with pytest.raises(ValueError, match="registers exist only for 'dinov2-' variants"):
    vit.decode_variant("B/16-reg4")


def test_ade20k_configs_start_from_augreg():
  for module, name in ((segvit_vit_b16_ade20k, "B_16"), (segvit_vit_l16_ade20k, "L_16")):
    c = module.get_config()
    assert c.model_init_format == "augreg-npz"
    assert c.model_init.startswith(f"weights/{name}-i21k-300ep-") and c.model_init.endswith(
        "res_384.npz")
