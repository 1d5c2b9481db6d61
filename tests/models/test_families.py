"""The table of model families (`segvit_jax.models`): which module a config selects, and that
each family's backbone built alone has exactly the whole model's backbone parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segvit_jax import models

VIT = dict(variant="mu/16", depth=2, posemb_grid=(4, 4))
HEAD = dict(width=32, num_heads=2)
CONFIGS = {
    "vit": dict(name="vit", backbone=VIT),
    "segvit": dict(name="segvit", num_classes=3, backbone=dict(VIT, cls_in_blocks=False),
                   head=dict(HEAD, tap_layers=(0, 1), layers_per_stage=1)),
    "segvit_mit": dict(name="segvit", num_classes=3,
                       backbone=dict(type="mit", variant="B0", depths=(1, 1, 1, 1)),
                       head=dict(HEAD, tap_layers=(1, 2, 3), layers_per_stage=1)),
    "segvit_shrunk": dict(name="segvit", num_classes=3,
                          backbone=dict(VIT, shrink_idx=1, cls_in_blocks=False),
                          head=dict(HEAD, type="shrunk", tap_layers=(0, 1), query_grid=(4, 4),
                                    qu_layers=1, atm_layers=1)),
    "segformer": dict(name="segformer", num_classes=3,
                      backbone=dict(variant="B0", depths=(1, 1, 1, 1)), head=dict(width=32)),
    "eomt": dict(name="eomt", num_classes=3, num_queries=4, num_blocks=1,
                 backbone=dict(variant="dinov2-S/14-reg4", width=32, depth=2, num_heads=2,
                               mlp_dim=64, patch_size=16, posemb_grid=(4, 4))),
}
FAMILIES = {"vit": "vit", "segvit": "segvit", "segvit_mit": "segvit",
            "segvit_shrunk": "segvit_shrunk", "segformer": "segformer", "eomt": "eomt"}


def _param_shapes(module, size=64):
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return jax.tree.map(np.shape, nn.meta.unbox(shapes["params"]))


def test_family_selects_the_module():
  for name, cfg in CONFIGS.items():
    assert models.family(cfg) == FAMILIES[name]
  assert models.MODELS["segvit_shrunk"] is models.shrunk
  assert models.family({"head": {"type": "atm"}}) == "segvit"  # name defaults to segvit
  for name in ("segvit_shrunk", "resnet"):  # the family key is not a model name
    with pytest.raises(ValueError, match=f"unknown model name '{name}'; known: 'eomt', "
                                         "'segformer', 'segvit', 'vit'"):
      models.family({"name": name})


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_backbone_alone_has_the_models_backbone_parameters(name):
  cfg = CONFIGS[name]
  whole = _param_shapes(models.build_model(cfg))
  backbone = _param_shapes(models.build_backbone(cfg))
  assert backbone == (whole if name == "vit" else whole["backbone"])


def test_query_downsampling_needs_the_shrunk_head():
  cfg = dict(CONFIGS["segvit"], backbone=dict(VIT, shrink_idx=1))
  with pytest.raises(ValueError, match="shrink_idx .* is SegViT-Shrunk's: set head.type='shrunk'"):
    models.build_model(cfg).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def test_input_divisors():
  assert {name: models.input_divisor(cfg) for name, cfg in CONFIGS.items()} == {
      "vit": 16, "segvit": 16, "segvit_mit": 32, "segvit_shrunk": 32, "segformer": 32,
      "eomt": 16}
