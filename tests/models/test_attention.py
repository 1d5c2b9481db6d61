"""The attention implementation switch (`config.model.attention`, layers.ATTENTION_IMPLEMENTATIONS):
every family's XLA path (what "auto" runs on a CPU) against the explicit softmax, inference and
EoMT's masked attention in training, gradients included; what "auto" picks where; the config
check and the resume rule.

Max abs differences, float32 on the CPU: EoMT inference 0 (XLA computes the same program);
every family, and EoMT's training with every query masked, within the asserted 5e-6; ViT
gradients 1.5e-8 (largest entry 0.13). On a CPU "auto" is "xla", the same call.
"""

import glob

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from segvit_jax import checkpoint, config_check, config_utils, models
from segvit_jax.models import layers
from tests import support
from tests.models.test_families import CONFIGS

SIZE = (64, 96)  # not square; a multiple of every family's input divisor


def _outputs(cfg, attention, variables=None, **kwargs):
  model = models.build_model(dict(cfg, attention=attention))
  x = jax.random.normal(jax.random.key(1), (1, *SIZE, 3))
  if variables is None:
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x))
  out = jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, x)  # one compile, not
  return variables, out  # one per operation


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_xla_path_equals_the_explicit_softmax(name):
  variables, xla = _outputs(CONFIGS[name], "xla")
  _, explicit = _outputs(CONFIGS[name], "explicit", variables)
  assert support.max_diff(xla, explicit) < 5e-6, support.max_diff(xla, explicit)


def test_eomt_masked_attention_in_training():
  cfg = CONFIGS["eomt"]
  probs = jnp.ones((cfg["num_blocks"],))  # every query masked to its mask logit > 0
  rngs = {"dropout": jax.random.key(2)}
  variables, xla = _outputs(cfg, "xla", train=True, mask_probs=probs, rngs=rngs)
  _, explicit = _outputs(cfg, "explicit", variables, train=True, mask_probs=probs, rngs=rngs)
  assert len(xla["aux_outputs"]) == cfg["num_blocks"]
  assert support.max_diff(xla, explicit) < 5e-6, support.max_diff(xla, explicit)


def test_gradients_agree():
  cfg = CONFIGS["vit"]
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  grads = {}
  for attention in ("xla", "explicit"):
    model = models.build_model(dict(cfg, attention=attention))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x))["params"]
    loss = lambda p: jnp.mean(model.apply({"params": p}, x)[0] ** 2)  # noqa: E731
    grads[attention] = jax.jit(jax.grad(loss))(params)
  # (measured 1.5e-8; the largest gradient entry is 0.13)
  assert support.max_diff(grads["xla"], grads["explicit"]) < 1e-7


def test_what_auto_picks(monkeypatch):
  pick = layers.attention_implementation
  assert pick("auto", jnp.bfloat16, 64, False) == "xla"  # this CPU: what every test runs
  assert pick("xla", jnp.bfloat16, 64, True) == "xla"
  assert pick("explicit", jnp.float32, 12, False) == "explicit"
  with pytest.raises(ValueError, match=r"attention='cudnn' needs an NVIDIA GPU of compute "
                                       r"capability >= 8.0; jax runs on 'cpu'"):
    pick("cudnn", jnp.bfloat16, 64, False)
  with pytest.raises(ValueError, match=r"unknown attention implementation 'flash'; expected "
                                       r"one of 'auto', 'xla', 'cudnn', 'explicit'"):
    pick("flash", jnp.bfloat16, 64, False)
  monkeypatch.setattr(layers, "cudnn_device", lambda: True)  # as on an H100 / H200
  assert pick("auto", jnp.bfloat16, 64, False) == "cudnn"
  assert pick("auto", jnp.float16, 128, False) == "cudnn"
  assert pick("auto", jnp.float32, 64, False) == "xla"  # cuDNN flash: half precision only
  assert pick("auto", jnp.bfloat16, 64, True) == "xla"  # EoMT's masked blocks
  assert pick("auto", jnp.bfloat16, 12, False) == "xla"  # head size not a multiple of 8
  assert pick("auto", jnp.bfloat16, 160, False) == "xla"  # above 128
  assert pick("cudnn", jnp.bfloat16, 64, True) == "cudnn"  # asked for: the mask as a bias
  with pytest.raises(ValueError, match=r"needs bfloat16 or float16 \(model.dtype\) and a head "
                                       r"size that is a multiple of 8 up to 128; got float32 "
                                       r"and 64"):
    pick("cudnn", jnp.float32, 64, False)


def test_config_key():
  # Every config's model section has the key, at the skeleton's default.
  for path in sorted(glob.glob("configs/*.py")):
    if path.endswith(("__init__.py", "common.py")):
      continue
    assert config_utils.load_config(path).model.attention == "auto", path
  # Checked before anything compiles, one line naming the key.
  c = ml_collections.ConfigDict({"model": {"num_classes": 3, "attention": "flash"}})
  assert config_check.settings_problems(c) == [
      "config.model.attention='flash' must be one of 'auto', 'xla', 'cudnn', 'explicit' (how "
      "attention is computed)"]
  # Free to change on resume: the parameters do not depend on it.
  assert not checkpoint.is_fixed_on_resume("model.attention")
  # A model config without the key (an older bundle's) builds with "auto".
  assert layers.attention_setting({"name": "vit"}) == "auto"
  assert models.build_model(CONFIGS["vit"]).attention == "auto"
