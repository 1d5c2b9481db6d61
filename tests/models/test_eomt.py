"""EoMT's step-dependent training inputs: the masked-attention annealing schedule against the
release's, and what `models.training_inputs` gives each model family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segvit_jax import models
from segvit_jax.models import eomt


def test_mask_annealing_windows():
  starts, ends = [10, 20, 30, 40], [20, 30, 40, 50]
  def release(t, s, e, p=0.9):  # the release's LightningModule.mask_annealing
    if t < s:
      return 1.0
    if t >= e:
      return 0.0
    return (1.0 - (t - s) / (e - s)) ** p
  for t in (0, 9, 10, 11, 15, 19, 20, 25, 39, 40, 49, 50, 1000):
    got = np.asarray(eomt.mask_annealing(t, starts, ends, 0.9))
    np.testing.assert_allclose(got, [release(t, s, e) for s, e in zip(starts, ends)],
                               rtol=1e-6, atol=1e-7, err_msg=str(t))
  got = jax.jit(lambda t: eomt.mask_annealing(t, starts, ends, 0.9))(jnp.int32(15))
  np.testing.assert_allclose(got[0], 0.5**0.9, rtol=1e-6)
  with pytest.raises(ValueError, match="must end after they start"):
    eomt.mask_annealing(0, [10], [10], 0.9)


def test_training_inputs_are_eomt_mask_probs():
  ann = dict(enabled=True, start_steps=(10, 20), end_steps=(20, 30), power=0.9)
  cfg = {"name": "eomt", "mask_annealing": ann}
  got = models.training_inputs(cfg, jnp.int32(15))
  assert list(got) == ["mask_probs"]
  np.testing.assert_allclose(got["mask_probs"], [0.5**0.9, 1.0], rtol=1e-6)
  with pytest.raises(ValueError, match="needs the training step"):
    models.training_inputs(cfg, None)
  assert models.training_inputs({"name": "eomt", "mask_annealing": {**ann, "enabled": False}},
                                jnp.int32(15)) == {}
  assert models.training_inputs({"name": "eomt"}, jnp.int32(15)) == {}
  for other in ({"name": "segvit", "head": {"type": "shrunk"}}, {"name": "segformer"}, {}):
    assert models.training_inputs(other, None) == {}
