"""The configs, checked by shape (jax.eval_shape), parameter count and the papers' recipe
numbers, never run; every config's `:smoke` variant builds; the library takes recipe numbers
from the config, never from a default of its own."""

import dataclasses
import glob
import importlib
import inspect
import os

import flax.linen as nn
import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, demo, segvit_vit_b16_ade20k, segvit_vit_l16_ade20k
from segvit_jax import convert, optim
from segvit_jax.data import pipeline, transforms
from segvit_jax.evaluation import inference, panoptic
from segvit_jax.losses import atm, mask_classification, pixel_ce
from segvit_jax.models import build_model, eomt, input_divisor, vit
from tests.support import ROOT

PAPER_CONFIGS = (
    "segvit_vit_b16_ade20k", "segvit_vit_l16_ade20k", "segvit_shrunk_vit_l16_ade20k",
    "segvit_shrunk_vit_b16_ade20k", "segvit_vit_l16_cocostuff10k",
    "segvit_shrunk_vit_l16_cocostuff10k", "segvit_vit_l16_pascal_context",
    "segvit_shrunk_vit_l16_pascal_context")


def load_config(name, arg=""):
  return importlib.import_module(f"configs.{name}").get_config(arg)


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


def decoder_layer_count(width):
  """Self- and cross-attention (q, k, v, out with biases), FFN 4 x width, three LayerNorms."""
  return 2 * 4 * (width * width + width) + 2 * width * 4 * width + 4 * width + width + 6 * width


def atm_count(in_dim, width, stages, layers, k):
  return stages * (in_dim * width + width + 2 * width + layers * decoder_layer_count(width)) + (
      k * width + width * (k + 1) + k + 1)


def shrunk_head_count(in_dim, width, taps, qu_layers, atm_layers, grid, k):
  qu = grid * grid * width + taps * (in_dim * width + 3 * width + qu_layers *
                                     decoder_layer_count(width))
  return qu + atm_layers * decoder_layer_count(width) + k * width + width * (k + 1) + k + 1


# The SegViT ATM heads (SegViT Table 5 for ViT-B's taps; the rest the release's config):
# variant -> (tap layers, width, heads, layers per stage).
ATM_HEAD = {"B/16": ((5, 7, 11), 384, 12, 3), "L/16": ((7, 15, 23), 512, 16, 3)}


# Pinned parameter counts (backbone, head) at each config's crop. The backbone differs between
# crops only by the stored position grid; the head by the class count and (Shrunk) the QU
# query grid. The paper reports no parameter counts for SegViT.
PINNED = {
    "segvit_vit_b16_ade20k": (86_433_024, 22_303_255),
    "segvit_vit_l16_ade20k": (304_737_280, 39_568_023),
    "segvit_shrunk_vit_l16_ade20k": (304_737_280, 39_861_399),
    "segvit_shrunk_vit_b16_ade20k": (86_433_024, 22_400_407),
    "segvit_vit_l16_cocostuff10k": (304_147_456, 39_589_548),
    "segvit_shrunk_vit_l16_cocostuff10k": (304_147_456, 39_588_012),
    "segvit_vit_l16_pascal_context": (304_020_480, 39_475_773),
    "segvit_shrunk_vit_l16_pascal_context": (304_020_480, 39_410_749),
}


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_parameter_counts(name):
  config = load_config(name)
  variant = config.model.backbone.variant
  got = param_counts(config)
  assert got == PINNED[name]
  width, depth, mlp = {"B/16": (768, 12, 3072), "L/16": (1024, 24, 4096)}[variant]
  crop = config.augment.crop_size[0]
  k = config.model.num_classes
  assert got[0] == vit_count(width, depth, mlp, 16, crop // 16)
  head_width = ATM_HEAD[variant][1]
  if "shrunk" in name:
    assert got[1] == shrunk_head_count(width, head_width, 2, 3, 3, crop // 16, k)
  else:
    assert got[1] == atm_count(width, head_width, 3, 3, k)


# name: (crop, stride, steps, weight decay, poly power, classes, dataset, train scale,
# test min_size)
RECIPES = {
    "segvit_vit_b16_ade20k": (512, 341, 160_000, 0.01, 1.0, 150, "ade20k", (2048, 512), 0),
    "segvit_vit_l16_ade20k": (640, 608, 160_000, 0.01, 1.0, 150, "ade20k", (2048, 640), 0),
    "segvit_shrunk_vit_l16_ade20k": (640, 608, 160_000, 0.01, 1.0, 150, "ade20k",
                                     (2048, 640), 0),
    "segvit_shrunk_vit_b16_ade20k": (512, 341, 160_000, 0.01, 1.0, 150, "ade20k",
                                     (2048, 512), 0),
    "segvit_vit_l16_cocostuff10k": (512, 341, 80_000, 0.02, 2.0, 171, "coco_stuff10k",
                                    (2048, 512), 512),
    "segvit_shrunk_vit_l16_cocostuff10k": (512, 341, 80_000, 0.02, 2.0, 171, "coco_stuff10k",
                                           (2048, 512), 512),
    "segvit_vit_l16_pascal_context": (480, 320, 80_000, 0.03, 1.0, 60, "pascal_context",
                                      (520, 520), 480),
    "segvit_shrunk_vit_l16_pascal_context": (480, 320, 80_000, 0.03, 1.0, 60, "pascal_context",
                                             (520, 520), 480),
}


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_recipe_numbers(name):
  crop, stride, steps, wd, power, k, dataset, scale, min_size = RECIPES[name]
  c = load_config(name)
  variant = c.model.backbone.variant
  assert c.augment.crop_size == (crop, crop) and c.eval.crop_size == (crop, crop)
  assert c.eval.stride == (stride, stride) and c.eval.mode == "slide"
  assert tuple(c.augment.scale) == tuple(c.eval.scale) == scale
  assert c.eval.min_size == min_size
  assert (c.total_steps, c.optim.weight_decay, c.optim.poly_power) == (steps, wd, power)
  assert (c.dataset.name, c.dataset.num_classes, c.model.num_classes) == (dataset, k, k)
  assert (c.optim.lr, c.optim.lr_mults["head"]) == (2e-5, 10.0)
  assert (c.optim.warmup_steps, c.optim.clip_norm, c.batch_size) == (1500, 35.0, 16)
  assert c.mean == c.std == (127.5, 127.5, 127.5)
  assert c.model.backbone.drop_path == {"B/16": 0.1, "L/16": 0.3}[variant]
  assert c.model.backbone.posemb_grid == (crop // 16, crop // 16)
  if "shrunk" in name:
    shrink, taps = {"B/16": (6, (5, 11)), "L/16": (8, (7, 23))}[variant]
    assert c.model.backbone.shrink_idx == shrink and c.model.head.type == "shrunk"
    assert tuple(c.model.head.tap_layers) == taps
    assert (c.model.head.width, c.model.head.num_heads) == ATM_HEAD[variant][1:3]
    assert (c.model.head.qu_layers, c.model.head.atm_layers) == (3, 3)
    assert tuple(c.model.head.query_grid) == (crop // 16, crop // 16)
    assert input_divisor(c.model) == 32
  else:
    taps, width, heads, layers = ATM_HEAD[variant]
    assert tuple(c.model.head.tap_layers) == taps
    assert (c.model.head.width, c.model.head.num_heads) == (width, heads)
    assert c.model.head.layers_per_stage == layers
    assert input_divisor(c.model) == 16


def test_pascal_context_59_class_variant():
  for name in ("segvit_vit_l16_pascal_context", "segvit_shrunk_vit_l16_pascal_context"):
    c = load_config(name, "59")
    assert (c.dataset.name, c.model.num_classes, c.dataset.num_classes) == (
        "pascal_context59", 59, 59)
    assert load_config(name, "60").dataset.name == "pascal_context"
    with pytest.raises(ValueError, match="unknown PASCAL-Context config argument '58'"):
      load_config(name, "58")


def test_l16_output_shapes_on_non_square_input():
  c = segvit_vit_l16_ade20k.get_config()
  model = build_model(c.model)
  x = jax.ShapeDtypeStruct((2, 640, 480, 3), jnp.float32)
  out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), x)  # one trace
  assert out["class_logits"].shape == (2, 150, 151)
  assert out["mask_logits"].shape == (2, 150, 640, 480)
  assert out["semantic_scores"].shape == (2, 150, 640, 480)
  assert [a["mask_logits"].shape for a in out["aux_outputs"]] == [(2, 150, 40, 30)] * 2


def test_demo_configs_build():
  for arg in ("", "smoke", "eomt"):
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
  with pytest.raises(ValueError, match=r"unknown ViT variant 'dinov4-B/16'"):
    vit.decode_variant("dinov4-B/16")
  with pytest.raises(ValueError, match="registers exist only for 'dinov2-' / 'dinov3-' variants"):
    vit.decode_variant("B/16-reg4")


def test_ade20k_configs_start_from_augreg():
  for module, name in ((segvit_vit_b16_ade20k, "B_16"), (segvit_vit_l16_ade20k, "L_16")):
    c = module.get_config()
    assert c.model_init_format == "augreg-npz"
    assert c.model_init.startswith(f"weights/{name}-i21k-300ep-") and c.model_init.endswith(
        "res_384.npz")


SEGFORMER_CONFIGS = [f"segformer_b{v}_{d}" for v in range(6) for d in ("ade20k", "cityscapes")]


@pytest.mark.parametrize("name", SEGFORMER_CONFIGS)
def test_segformer_config_recipes_and_shapes(name):
  c = load_config(name)
  variant, dataset = name.split("_")[1].upper(), name.split("_")[2]
  crop = 1024 if dataset == "cityscapes" else (640 if variant == "B5" else 512)
  k = 19 if dataset == "cityscapes" else 150
  assert c.model.name == "segformer" and c.model.backbone.variant == variant
  assert c.model.head.width == (256 if variant in ("B0", "B1") else 768)
  assert (c.augment.crop_size, tuple(c.augment.scale)) == ((crop, crop), (2048, crop))
  assert (c.optim.lr, c.optim.weight_decay, c.optim.lr_mults["head"]) == (6e-5, 0.01, 10.0)
  assert (c.optim.poly_power, c.optim.warmup_steps, c.optim.clip_norm) == (1.0, 1500, 0.0)
  assert (c.total_steps, c.batch_size) == (160_000, 8 if dataset == "cityscapes" else 16)
  assert c.loss.name == "pixel_ce" and c.model.backbone.drop_path == 0.1
  assert (c.mean, c.std) == ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
  if dataset == "cityscapes":
    assert (c.eval.mode, c.eval.crop_size, c.eval.stride) == ("slide", (1024, 1024), (768, 768))
  else:
    assert (c.eval.mode, c.eval.resize, c.eval.size_divisor) == ("whole",
                                                                  "keep_ratio_aligned", 32)
  assert c.model_init == f"weights/mit_{variant.lower()}.pth"
  model = build_model(c.model)
  x = jax.ShapeDtypeStruct((1, 384, 640, 3), jnp.float32)
  out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), x)
  assert set(variables) == {"params", "batch_stats"}
  assert out["logits"].shape == (1, k, 96, 160)
  assert out["semantic_scores"].shape == (1, k, 384, 640)


def test_segvit_atm_on_mit_b2_config():
  c = load_config("segvit_atm_mit_b2_ade20k")
  assert c.model.backbone.type == "mit" and c.loss.get("name", "atm") == "atm"
  model = build_model(c.model)
  x = jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32)
  out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), x)  # one trace
  assert out["class_logits"].shape == (1, 150, 151)
  assert out["semantic_scores"].shape == (1, 150, 512, 512)
  # Stages 4, 3, 2: every stage's masks summed on the 1/8 grid.
  assert [a["mask_logits"].shape for a in out["aux_outputs"]] == [(1, 150, 64, 64)] * 2
  backbone, head = param_counts(c)
  assert backbone == param_counts(load_config("segformer_b2_ade20k"))[0] == 24_196_288
  w, k = 256, 150  # input projections from 512-, 320- and 128-wide stages
  assert head == 9_806_231 == ((512 + 320 + 128) * w + 3 * 3 * w + 9 * decoder_layer_count(w)
                               + k * w + w * (k + 1) + k + 1)


# ----------------------------------------------------------------------------------------------
# Every config, its :smoke variant, and the papers' tables.

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if os.path.basename(p) not in ("__init__.py", "common.py"))
RECIPE_CONFIGS = [n for n in CONFIGS if n != "demo"]


def test_the_config_list_is_complete():
  assert len(RECIPE_CONFIGS) == 43 and set(PAPER) == set(RECIPE_CONFIGS)


def init_shapes(config, h, w):
  """(parameter count, the outputs' shapes) of `config.model` on a (2, h, w, 3) batch."""
  model = build_model(config.model)
  x = jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32)
  out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), x)  # one trace
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables)), out


@pytest.mark.parametrize("name", RECIPE_CONFIGS)
def test_smoke_variant_keeps_the_recipe_structure_and_initialises(name):
  full, smoke = load_config(name), load_config(name, "smoke")
  s = common.SMOKE_CROP
  # The same families, dataset, pipelines, loss and protocol.
  for key in ("model.name", "model.backbone.variant", "dataset.name", "dataset.num_classes",
              "augment.pipeline", "loss.name", "eval.task", "eval.mode", "eval.resize",
              "eval.average", "optim.schedule", "mean", "std"):
    get = lambda c: functools.reduce(lambda node, k: node[k], key.split("."), c)  # noqa: E731
    assert get(smoke) == get(full), key
  assert smoke.model.get("head", {}).get("type") == full.model.get("head", {}).get("type")
  assert smoke.model.backbone.get("type") == full.model.backbone.get("type")
  # Small and fast: crop SMOKE_CROP, batch 2, two steps, no pretrained weights, float32.
  assert smoke.augment.crop_size == smoke.eval.crop_size == (s, s)
  assert (smoke.batch_size, smoke.total_steps, smoke.model_init) == (2, 2, "")
  assert smoke.model.dtype == "float32" and smoke.dataset.num_workers == 0
  crop = full.augment.crop_size[0]
  assert smoke.eval.stride == tuple(v * s // crop for v in full.eval.stride)
  # The real structure, tiny.
  m, fm = smoke.model, full.model
  if m.name != "segformer" and m.backbone.get("type") != "mit":
    assert (m.backbone.depth, m.backbone.width) == (common.SMOKE_DEPTH, 32)
    assert m.backbone.posemb_grid == (s // vit.patch_size(m.backbone),) * 2
  if "head" in m and "tap_layers" in m.head:
    taps = tuple(m.head.tap_layers)
    assert len(taps) == len(fm.head.tap_layers) and taps == tuple(sorted(set(taps)))
  if m.backbone.get("shrink_idx") is not None:  # QU reads the block before QD and the last
    assert taps == (m.backbone.shrink_idx - 1, common.SMOKE_DEPTH - 1)
    assert tuple(fm.head.tap_layers) == (fm.backbone.shrink_idx - 1,
                                         vit.decode_variant(fm.backbone.variant)["depth"] - 1)
    assert m.head.query_grid == m.backbone.posemb_grid
  if m.name == "eomt":
    assert 1 <= m.num_blocks < m.backbone.depth and m.mask_annealing.enabled
    assert len(m.mask_annealing.start_steps) == len(m.mask_annealing.end_steps) == m.num_blocks
    assert smoke.loss.num_queries == m.num_queries
  # The smoke model initialises at the smoke crop, small.
  count, out = init_shapes(smoke, s, s)
  assert count < 200_000, count
  k = smoke.model.num_classes
  assert out["semantic_scores"].shape == (2, k, s, s)


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_config_arguments_fail(name):
  with pytest.raises(ValueError, match="unknown .*config argument 'nope'"):
    load_config(name, "nope")


def test_pascal_context_smoke_variants():
  for name in ("segvit_vit_l16_pascal_context", "segvit_shrunk_vit_l16_pascal_context"):
    assert load_config(name, "59,smoke").dataset.name == "pascal_context59"
    assert load_config(name, "smoke").model.num_classes == 60


# The papers' recipe tables, stated here: name -> (crop, iterations, lr, global batch, weight
# decay, test mode, test stride, head). Head: ATM / Shrunk (width, heads); SegFormer decoder
# width; EoMT (queries, L2). SegViT Sec. 4.2 and its release's configs; SegFormer Sec. 4.1,
# Table 1b and its release's configs; EoMT Sec. 4.1, App. A.1 / A.2 and its release's configs.
_SEGFORMER = {f"segformer_b{v}_{d}": (
    (1024 if d == "cityscapes" else (640 if v == 5 else 512)), 160_000, 6e-5,
    8 if d == "cityscapes" else 16, 0.01, "slide" if d == "cityscapes" else "whole",
    768 if d == "cityscapes" else (426 if v == 5 else 341), 256 if v < 2 else 768)
    for v in range(6) for d in ("ade20k", "cityscapes")}
PAPER = {
    "segvit_vit_b16_ade20k": (512, 160_000, 2e-5, 16, 0.01, "slide", 341, (384, 12)),
    "segvit_vit_l16_ade20k": (640, 160_000, 2e-5, 16, 0.01, "slide", 608, (512, 16)),
    "segvit_shrunk_vit_b16_ade20k": (512, 160_000, 2e-5, 16, 0.01, "slide", 341, (384, 12)),
    "segvit_shrunk_vit_l16_ade20k": (640, 160_000, 2e-5, 16, 0.01, "slide", 608, (512, 16)),
    "segvit_vit_l16_cocostuff10k": (512, 80_000, 2e-5, 16, 0.02, "slide", 341, (512, 16)),
    "segvit_shrunk_vit_l16_cocostuff10k": (512, 80_000, 2e-5, 16, 0.02, "slide", 341,
                                           (512, 16)),
    "segvit_vit_l16_pascal_context": (480, 80_000, 2e-5, 16, 0.03, "slide", 320, (512, 16)),
    "segvit_shrunk_vit_l16_pascal_context": (480, 80_000, 2e-5, 16, 0.03, "slide", 320,
                                             (512, 16)),
    "segvit_atm_mit_b2_ade20k": (512, 160_000, 6e-5, 16, 0.01, "whole", 341, (256, 8)),
    **_SEGFORMER,
    "eomt_vit_s_ade20k": (512, 39_120, 1e-4, 16, 0.05, "spread", 512, (100, 3)),
    "eomt_vit_b_ade20k": (512, 39_120, 1e-4, 16, 0.05, "spread", 512, (100, 3)),
    "eomt_vit_l_ade20k": (512, 39_120, 1e-4, 16, 0.05, "spread", 512, (100, 4)),
    "eomt_vit_l_cityscapes": (1024, 19_902, 1e-4, 16, 0.05, "spread", 1024, (100, 4)),
    "eomt_vit_s_coco_panoptic": (640, 88_692, 1e-4, 16, 0.05, "spread", 640, (200, 3)),
    "eomt_vit_b_coco_panoptic": (640, 88_692, 1e-4, 16, 0.05, "spread", 640, (200, 3)),
    "eomt_vit_l_coco_panoptic": (640, 88_692, 1e-4, 16, 0.05, "spread", 640, (200, 4)),
    "eomt_vit_g_coco_panoptic": (640, 88_692, 1e-4, 16, 0.05, "spread", 640, (200, 5)),
    "eomt_vit_l_coco_panoptic_1280": (1280, 88_692, 1e-4, 16, 0.05, "spread", 1280, (200, 4)),
    # ADE20K panoptic: the release's configs/dinov2/ade20k/panoptic/eomt_{large,giant}_*.yaml,
    # 31 epochs x ceil(20210 / 16) steps.
    "eomt_vit_l_ade20k_panoptic": (640, 39_184, 1e-4, 16, 0.05, "spread", 640, (200, 4)),
    "eomt_vit_g_ade20k_panoptic": (640, 39_184, 1e-4, 16, 0.05, "spread", 640, (200, 5)),
    "eomt_vit_l_ade20k_panoptic_1280": (1280, 39_184, 1e-4, 16, 0.05, "spread", 1280, (200, 4)),
    "eomt_vit_g_ade20k_panoptic_1280": (1280, 39_184, 1e-4, 16, 0.05, "spread", 1280, (200, 5)),
    "eomt_vit_l_coco_instance": (640, 88_692, 1e-4, 16, 0.05, "spread", 640, (200, 4)),
    "eomt_vit_l_coco_instance_1280": (1280, 88_692, 1e-4, 16, 0.05, "spread", 1280, (200, 4)),
    # EoMT on DINOv3: the release's configs/dinov3/... and its DINOv3 model zoo.
    "eomt_dinov3_vit_s_coco_panoptic": (640, 177_384, 2e-4, 16, 0.05, "spread", 640, (200, 3)),
    "eomt_dinov3_vit_b_coco_panoptic": (640, 177_384, 2e-4, 16, 0.05, "spread", 640, (200, 3)),
    "eomt_dinov3_vit_l_coco_panoptic": (640, 88_692, 2e-4, 16, 0.05, "spread", 640, (200, 4)),
    "eomt_dinov3_vit_l_coco_panoptic_1280": (1280, 88_692, 2e-4, 16, 0.05, "spread", 1280,
                                             (200, 4)),
    "eomt_dinov3_vit_l_ade20k": (512, 20_208, 2e-4, 16, 0.05, "spread", 512, (100, 4)),
    "eomt_dinov3_vit_l_coco_instance": (640, 88_692, 2e-4, 16, 0.05, "spread", 640, (200, 4)),
    "eomt_dinov3_vit_l_coco_instance_1280": (1280, 88_692, 2e-4, 16, 0.05, "spread", 1280,
                                             (200, 4)),
}


def release_windows(part, l2):
  """The EoMT release's DINOv2 annealing windows (its configs/dinov2/...): one `part` (a sixth
  of the run) each, starts spread evenly from 1 to 4 parts, halves rounded up."""
  starts = tuple(int(part * (1 + 3 * i / (l2 - 1)) + 0.5) for i in range(l2))
  return starts, tuple(s + part for s in starts)


def test_release_windows_rule_reproduces_the_releases_lists():
  """The rule against the lists of the release's yaml files for 3, 4 and 5 query blocks."""
  assert release_windows(14782, 3) == ((14782, 36955, 59128), (29564, 51737, 73910))
  assert release_windows(29564, 3) == ((29564, 73910, 118256), (59128, 103474, 147820))
  assert release_windows(14782, 4) == ((14782, 29564, 44346, 59128),
                                       (29564, 44346, 59128, 73910))
  assert release_windows(14782, 5) == ((14782, 25869, 36955, 48042, 59128),
                                       (29564, 40651, 51737, 62824, 73910))
  assert release_windows(6520, 5) == ((6520, 11410, 16300, 21190, 26080),
                                      (13040, 17930, 22820, 27710, 32600))
  assert release_windows(3317, 4) == ((3317, 6634, 9951, 13268), (6634, 9951, 13268, 16585))


# The DINOv3 windows of the release's configs/dinov3/... (no rule: its first query block anneals
# over the first 3000 steps).
DINOV3_WINDOWS = {
    "eomt_dinov3_vit_s_coco_panoptic": ((0, 73910, 118256), (3000, 103474, 147820)),
    "eomt_dinov3_vit_b_coco_panoptic": ((0, 73910, 118256), (3000, 103474, 147820)),
    "eomt_dinov3_vit_l_coco_panoptic": ((0, 29564, 44346, 59128), (3000, 44346, 59128, 73910)),
    "eomt_dinov3_vit_l_coco_panoptic_1280": ((0, 29564, 44346, 59128),
                                             (3000, 44346, 59128, 73910)),
    "eomt_dinov3_vit_l_ade20k": ((0, 6520, 9780, 13040), (3000, 9780, 13040, 16300)),
    # configs/dinov3/coco/instance/eomt_large_{640,1280}.yaml: the DINOv2 windows.
    "eomt_dinov3_vit_l_coco_instance": ((14782, 29564, 44346, 59128),
                                        (29564, 44346, 59128, 73910)),
    "eomt_dinov3_vit_l_coco_instance_1280": ((14782, 29564, 44346, 59128),
                                             (29564, 44346, 59128, 73910)),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_configs_state_the_papers_numbers(name):
  crop, steps, lr, batch, wd, mode, stride, head = PAPER[name]
  c = load_config(name)
  assert c.augment.crop_size == c.eval.crop_size == (crop, crop)
  assert (c.total_steps, c.optim.lr, c.batch_size, c.optim.weight_decay) == (steps, lr, batch, wd)
  assert (c.eval.mode, c.eval.stride) == (mode, (stride, stride))
  m = c.model
  if m.name == "eomt":
    assert (m.num_queries, m.num_blocks) == head and c.loss.num_queries == m.num_queries
    # EoMT: two-stage warm-up 500 / 1000, poly 0.9, layer decay 0.8 on every block, clip
    # 0.01, no lr multipliers, weight decay on every parameter; Mask2Former's loss numbers. On
    # DINOv3 (the release's configs/dinov3/...): warm-up 2000 / 3000, the query blocks
    # undecayed (`llrd_l2_enabled: False`); ADE20K no layer decay at all (`llrd: 1.0`).
    o, dinov3 = c.optim, name in DINOV3_WINDOWS
    decay, skip = (None, 0) if name == "eomt_dinov3_vit_l_ade20k" else (
        (0.8, m.num_blocks) if dinov3 else (0.8, 0))
    assert (o.schedule, o.warmup_steps, o.backbone_warmup_steps, o.poly_power, o.layer_decay,
            o.layer_decay_skip_last, o.clip_norm, dict(o.lr_mults), tuple(o.no_decay)) == (
                "two_stage", *((2000, 3000) if dinov3 else (500, 1000)), 0.9, decay, skip,
                0.01, {}, ())
    assert m.backbone.variant.startswith("dinov3-" if dinov3 else "dinov2-")
    assert {k: c.loss[k] for k in ("num_points", "oversample_ratio", "importance_ratio",
                                   "no_object_weight", "class_weight", "mask_weight",
                                   "dice_weight")} == dict(
        num_points=12544, oversample_ratio=3.0, importance_ratio=0.75, no_object_weight=0.1,
        class_weight=2.0, mask_weight=5.0, dice_weight=5.0)
    # Annealing: the release's windows (DINOv2: its rule, which reproduces its lists; ADE20K
    # panoptic's yaml files keep the sixths of its ADE20K semantic run, 6520 steps).
    part = 6520 if "ade20k_panoptic" in name else steps // 6
    windows = DINOV3_WINDOWS[name] if dinov3 else release_windows(part, m.num_blocks)
    assert (m.mask_annealing.start_steps, m.mask_annealing.end_steps) == windows
    assert (m.mask_annealing.power, m.dtype) == (0.9, "bfloat16")
    assert c.eval.average == "scores"
    return
  if m.name == "segformer":
    assert m.head.width == head
  else:
    assert (m.head.width, m.head.num_heads) == head
  # mmseg-style recipes: warm-up 1500 from 1e-6 x lr, poly, decoder lr x10, no decay on the
  # backbone's norms; SegViT clips at 35, SegFormer not at all.
  o = c.optim
  assert (o.schedule, o.warmup_steps, o.warmup_ratio, dict(o.lr_mults), o.layer_decay) == (
      "warmup_poly", 1500, 1e-6, {"head": 10.0}, None)
  assert tuple(o.no_decay) == (r"^backbone/.*norm",)
  assert o.clip_norm == (35.0 if c.optim.lr == 2e-5 else 0.0)
  assert c.eval.average == "softmax"
  if c.loss.name == "atm":
    assert {k: c.loss[k] for k in ("ce_weight", "no_object_weight", "focal_weight",
                                   "focal_alpha", "focal_gamma", "dice_weight")} == dict(
        ce_weight=1.0, no_object_weight=0.1, focal_weight=20.0, focal_alpha=0.25,
        focal_gamma=2.0, dice_weight=1.0)
  a = c.augment
  assert (a.pipeline, a.ratio_range, a.cat_max_ratio, a.flip_prob, a.photometric) == (
      "segvit", (0.5, 2.0), 0.75, 0.5, True)


@pytest.mark.parametrize("name", ["eomt_vit_s_coco_panoptic", "eomt_vit_b_coco_panoptic"])
def test_2x_schedule_of_the_small_coco_configs(name):
  """The release's eomt_{small,base}_640_2x.yaml: 24 epochs, its windows; nothing else moves."""
  one, two = load_config(name), load_config(name, "2x")
  assert (one.total_steps, two.total_steps) == (88_692, 177_384)
  ma = two.model.mask_annealing
  assert (ma.start_steps, ma.end_steps) == release_windows(29_564, 3) == (
      (29564, 73910, 118256), (59128, 103474, 147820))
  one.total_steps, one.model.mask_annealing = two.total_steps, two.model.mask_annealing
  assert one.to_dict() == two.to_dict()
  smoke = load_config(name, "2x,smoke")
  assert (smoke.total_steps, smoke.model.num_blocks) == (2, 2)


def eomt_dinov3_hf_count(config) -> int:
  """Parameters of transformers' EomtDinov3ForUniversalSegmentation of the config's sizes
  (its DINOv3 ViT as the released checkpoints: 4 registers, patch 16), built on the meta
  device (nothing allocated)."""
  import torch
  import transformers
  m = config.model
  f = vit.decode_variant(m.backbone.variant)
  hf_config = transformers.EomtDinov3Config(
      hidden_size=f["width"], num_hidden_layers=f["depth"], num_attention_heads=f["num_heads"],
      intermediate_size=f["mlp_dim"], num_blocks=m.num_blocks, num_queries=m.num_queries,
      num_labels=m.num_classes, image_size=config.augment.crop_size[0], patch_size=16,
      num_register_tokens=4)
  with torch.device("meta"):
    hf = transformers.EomtDinov3ForUniversalSegmentation(hf_config)
  return sum(p.numel() for p in hf.parameters())


# The DINOv3 backbones' parameter counts (transformers' DINOv3ViTModel of the released
# facebook/dinov3-vit{s,b,l}16-pretrain-lvd1689m, less its pre-training mask token;
# tests/models/test_dinov3.py) and the weights file of the facebookresearch/dinov3 release.
DINOV3_BACKBONES = {"S": (21_596_160, "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"),
                    "B": (85_659_648, "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"),
                    "L": (303_128_576, "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth")}


@pytest.mark.parametrize("name", sorted(DINOV3_WINDOWS))
def test_eomt_dinov3_configs_count_what_transformers_counts(name):
  """jax.eval_shape of each EoMT-DINOv3 config: its parameters equal transformers'
  EomtDinov3ForUniversalSegmentation of the same sizes, the backbone the released DINOv3's;
  it starts from the release's DINOv3 file of that size; the outputs' shapes at a non-square
  size."""
  c = load_config(name)
  size = c.model.backbone.variant.split("-")[1].split("/")[0]
  backbone_count, weights = DINOV3_BACKBONES[size]
  model = build_model(c.model)
  h, w = 256, 320  # both multiples of the patch, not square
  x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  out, variables = jax.eval_shape(  # one trace: the outputs and the parameters
      functools.partial(model.init_with_output, train=False), jax.random.key(0), x)
  count = lambda t: sum(int(np.prod(v.shape)) for v in jax.tree.leaves(t))  # noqa: E731
  assert count(variables["params"]["backbone"]) == backbone_count
  assert count(variables["params"]) == eomt_dinov3_hf_count(c), name
  k, q = c.model.num_classes, c.model.num_queries
  assert out["class_logits"].shape == (1, q, k + 1)
  assert out["mask_logits"].shape == (1, q, h // 4, w // 4)
  assert (c.model_init, c.model_init_format) == (f"weights/{weights}", "dinov3")
  assert c.model_init_format in convert.FORMATS


# The ADE20K panoptic configs beside the COCO ones of the same size (the release's
# configs/dinov2/ade20k/panoptic/*.yaml): what differs is the data, the colour jitter and the
# class head; the parameters are those of transformers' EomtForUniversalSegmentation of the sizes
# (plus the cls token's zero position slot ours keeps).
ADE20K_PANOPTIC = {"eomt_vit_l_ade20k_panoptic": "eomt_vit_l_coco_panoptic",
                   "eomt_vit_g_ade20k_panoptic": "eomt_vit_g_coco_panoptic",
                   "eomt_vit_l_ade20k_panoptic_1280": "eomt_vit_l_coco_panoptic_1280",
                   "eomt_vit_g_ade20k_panoptic_1280": "eomt_vit_g_coco_panoptic"}


@pytest.mark.parametrize("name", sorted(ADE20K_PANOPTIC))
def test_eomt_ade20k_panoptic_configs(name):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  c, coco = load_config(name), load_config(ADE20K_PANOPTIC[name])
  px = c.augment.crop_size[0]
  assert (c.dataset.name, c.dataset.root, c.dataset.num_classes, c.dataset.max_segments) == (
      "ade20k_panoptic", "data/ADEChallengeData2016", 150, 255)
  assert c.augment.color_jitter and not coco.augment.color_jitter
  assert (c.model_init, c.model_init_format) == (coco.model_init, "dinov2")
  assert c.model.backbone.posemb_grid == (px // 16, px // 16)
  # Apart from those, the COCO recipe (the 1280 g: the 640 one at 1280).
  diff = {"dataset": ("name", "root", "num_classes", "max_segments"), "augment": ("color_jitter",
          "crop_size"), "eval": ("scale", "crop_size", "stride"), "model": ("num_classes",
          "mask_annealing")}
  for section, keys in diff.items():
    for k in keys:
      c[section][k] = coco[section][k]
  c.model.backbone.posemb_grid, c.total_steps = coco.model.backbone.posemb_grid, coco.total_steps
  assert c.to_dict() == coco.to_dict()
  c = load_config(name)
  model = build_model(c.model)
  h, w = 256, 320  # both multiples of the patch, not square
  x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  out, variables = jax.eval_shape(
      functools.partial(model.init_with_output, train=False), jax.random.key(0), x)
  count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
  f, m = vit.decode_variant(c.model.backbone.variant), c.model
  hf_config = transformers.EomtConfig(
      hidden_size=f["width"], num_hidden_layers=f["depth"], num_attention_heads=f["num_heads"],
      num_blocks=m.num_blocks, num_queries=m.num_queries, num_labels=150, image_size=px,
      patch_size=16, use_swiglu_ffn=f.get("ffn") == "swiglu")
  with torch.device("meta"):
    hf = transformers.EomtForUniversalSegmentation(hf_config)
  assert count == sum(p.numel() for p in hf.parameters()) + f["width"]
  assert out["class_logits"].shape == (1, 200, 151)
  assert out["mask_logits"].shape == (1, 200, h // 4, w // 4)


# ----------------------------------------------------------------------------------------------
# The library holds no recipe numbers: the functions and dataclasses of these modules take the
# numbers below (loss weights, point counts, thresholds, crops, strides, augmentation factors,
# schedules, EoMT's block counts and input size) as arguments, without a default.

RECIPE_ARGUMENTS = {
    "ce_weight", "no_object_weight", "focal_weight", "focal_alpha", "focal_gamma", "dice_weight",
    "class_weight", "mask_weight", "num_points", "oversample_ratio", "importance_ratio",
    "ignore_in_masks", "avg_non_ignore", "ignore_index", "object_mask_threshold",
    "overlap_threshold", "top_k", "crop", "crop_size", "stride", "size_divisor", "min_size",
    "ratio", "ratios", "scale", "mode", "average", "flip", "brightness", "contrast",
    "saturation", "hue", "brightness_delta", "contrast_range", "saturation_range", "hue_delta",
    "cat_max_ratio", "prob", "pad_value", "label_pad_value", "scale_range", "target_size",
    "power", "image_size", "num_blocks", "warmup_steps", "warmup_ratio", "min_lr",
    "backbone_warmup_steps",
}
MODULES = (atm, pixel_ce, mask_classification, inference, panoptic, transforms, pipeline, eomt,
           optim)


def _defaults(obj):
  """{argument: default} of a function, or of a dataclass's fields (None: "not used here", no
  number)."""
  if dataclasses.is_dataclass(obj):
    return {f.name: f.default for f in dataclasses.fields(obj)
            if f.default is not dataclasses.MISSING}
  try:
    params = inspect.signature(obj).parameters.values()
  except (TypeError, ValueError):
    return {}
  return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def test_library_functions_have_no_recipe_defaults():
  found = []
  for module in MODULES:
    for name, obj in vars(module).items():
      if name.startswith("__") or not callable(obj):
        continue
      wrapped = inspect.unwrap(obj)
      if getattr(wrapped, "__module__", None) != module.__name__:
        continue  # imported from elsewhere
      where = f"{module.__name__}.{name}"
      found += [f"{where}({arg}={value!r})" for arg, value in _defaults(wrapped).items()
                if arg in RECIPE_ARGUMENTS and value is not None]
  assert not found, found
  # The test sees the arguments it is meant to (a function and a dataclass of each kind).
  assert "focal_weight" in inspect.signature(atm.atm_loss).parameters
  assert "crop" in {f.name for f in dataclasses.fields(inference.Protocol)}
