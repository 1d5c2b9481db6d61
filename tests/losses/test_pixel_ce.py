"""The per-pixel cross-entropy (SegFormer's loss) against torch's, mmseg 0.x semantics: logits
resized bilinearly to the label size, ignore pixels add nothing, mean over all pixels (or over
labelled ones with avg_non_ignore); its accumulation normaliser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segvit_jax.losses import LOSSES, get_loss
from segvit_jax.losses.pixel_ce import pixel_ce_loss, pixel_ce_normalisers


def _case(seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(2, 5, 8, 12)).astype(np.float32) * 3
  labels = rng.integers(0, 5, (2, 32, 48)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.25] = 255
  return logits, labels


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_pixel_cross_entropy_equals_torch(avg_non_ignore):
  logits, labels = _case()
  loss, terms = pixel_ce_loss({"logits": jnp.asarray(logits)}, jnp.asarray(labels),
                              num_classes=5, ignore_index=255, ce_weight=1.0,
                              avg_non_ignore=avg_non_ignore)
  up = F.interpolate(torch.from_numpy(logits).double(), size=(32, 48), mode="bilinear",
                     align_corners=False)
  nll = F.cross_entropy(up, torch.from_numpy(labels).long(), ignore_index=255, reduction="none")
  expected = (nll.sum() / (labels != 255).sum()) if avg_non_ignore else nll.mean()
  assert abs(float(loss) - float(expected)) < 2e-6, (float(loss), float(expected))
  assert set(terms) == {"loss_ce"}


def test_pixel_cross_entropy_gradient_equals_torch():
  logits, labels = _case(1)
  grad = jax.grad(lambda x: pixel_ce_loss({"logits": x}, jnp.asarray(labels), num_classes=5,
                                          ignore_index=255, ce_weight=1.0,
                                          avg_non_ignore=False)[0])(jnp.asarray(logits))
  x = torch.from_numpy(logits).double().requires_grad_()
  up = F.interpolate(x, size=(32, 48), mode="bilinear", align_corners=False)
  (F.cross_entropy(up, torch.from_numpy(labels).long(), ignore_index=255, reduction="sum")
   / labels.size).backward()
  np.testing.assert_allclose(np.asarray(grad), x.grad.numpy(), atol=1e-7)  # max abs diff


def test_normalisers_and_registry():
  _, labels = _case(1)
  assert float(pixel_ce_normalisers(jnp.asarray(labels), 5, 255, False)["pixels"]) == labels.size
  got = pixel_ce_normalisers(jnp.asarray(labels), 5, 255, avg_non_ignore=True)["pixels"]
  assert float(got) == float(np.sum(labels != 255))
  loss, options = get_loss({"name": "pixel_ce", "avg_non_ignore": True})
  assert loss is LOSSES["pixel_ce"] and options == {"avg_non_ignore": True}
  assert loss.term_normaliser("loss_ce") == ("pixels", 1.0)
  assert get_loss({"ce_weight": 1.0})[0] is LOSSES["atm"]  # no name: SegViT's ATM loss
  with pytest.raises(ValueError, match="config.loss.name='focal': expected one of atm, "
                                       "pixel_ce"):
    get_loss({"name": "focal"})
