"""Losses by name (`config.loss.name`): each with the denominators gradient accumulation needs
to weight micro-batches exactly (see `trainer.accumulated_value_and_grad`).

  atm         SegViT's ATM loss (`atm.py`): the default
  pixel_ce    per-pixel cross-entropy of per-pixel classifiers, SegFormer (`pixel_ce.py`)
  mask2former Hungarian-matched mask classification, EoMT (`mask_classification.py`;
              semantic targets: one mask per class present; draws points, so it takes `rng`)
  mask2former_panoptic
              the same on panoptic segments: the label map is a segment-index map and the
              batch's `segment_classes` (B, M) give each segment's class (-1: none)

The mask classification losses divide their mask terms by all the batch's ground-truth masks
or by the matched ones (`config.loss.mask_normalizer`: Mask2Former's or the EoMT release's).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

from segvit_jax.losses import atm, mask_classification, pixel_ce
from segvit_jax.losses.atm import atm_loss
from segvit_jax.losses.mask_classification import (mask2former_panoptic_loss,
                                                   mask2former_semantic_loss)
from segvit_jax.losses.pixel_ce import pixel_ce_loss


@dataclasses.dataclass(frozen=True)
class Loss:
  """`fn(outputs, labels, num_classes=, ignore_index=, **options) -> (loss, terms)` (and
  `rng=` when `needs_rng`, and the batch's `batch_keys` entries by name);
  `normalisers(labels, num_classes, ignore_index, options) -> {name: denominator}` of the
  batch (they add up over micro-batches; the `batch_keys` entries by name too, if any);
  `terms`: term name (auxiliary suffix `_i` stripped) -> (its denominator's name, the floor
  the loss applies to it)."""

  fn: Callable[..., Any]
  normalisers: Callable[..., Mapping[str, Any]]
  terms: Mapping[str, tuple[str, float]]
  needs_rng: bool = False
  batch_keys: tuple[str, ...] = ()  # batch entries besides "label" passed to fn by name
  # The `SHARED_OPTIONS` this loss takes (required: a config that replaces the skeleton's loss
  # section states them); `get_loss` drops the others.
  shared_options: tuple[str, ...] = ()

  def term_normaliser(self, name: str) -> tuple[str, float]:
    base = re.sub(r"_\d+$", "", name)
    if base not in self.terms:
      raise KeyError(f"loss term {name!r} has no known normaliser; gradient accumulation "
                     f"needs one (known: {', '.join(self.terms)})")
    return self.terms[base]


# Keys of the skeleton's loss section (configs/common.py) besides the ATM loss's, each read by
# some losses only: "mask_normalizer", what the mask classification losses divide their mask
# terms by (`mask_classification.MASK_NORMALIZERS`).
SHARED_OPTIONS = ("mask_normalizer",)

LOSSES = {
    "atm": Loss(
        fn=lambda out, labels, *, num_classes, ignore_index, **o: atm_loss(
            out, labels, num_classes=num_classes, ignore_index=ignore_index, **o),
        normalisers=lambda labels, k, ignore_index, o: atm.atm_normalisers(
            labels, k, o["no_object_weight"]),
        terms=atm.TERM_NORMALISERS),
    "pixel_ce": Loss(
        fn=pixel_ce_loss,
        normalisers=lambda labels, k, ignore_index, o: pixel_ce.pixel_ce_normalisers(
            labels, k, ignore_index, o["avg_non_ignore"]),
        terms=pixel_ce.TERM_NORMALISERS),
    "mask2former": Loss(
        fn=mask2former_semantic_loss,
        normalisers=mask_classification.mask2former_normalisers,
        terms=mask_classification.TERM_NORMALISERS, needs_rng=True,
        shared_options=("mask_normalizer",)),
    "mask2former_panoptic": Loss(
        fn=mask2former_panoptic_loss,
        normalisers=mask_classification.mask2former_panoptic_normalisers,
        terms=mask_classification.TERM_NORMALISERS, needs_rng=True,
        batch_keys=("segment_classes",), shared_options=("mask_normalizer",)),
}


def loss_name(loss_cfg: Mapping[str, Any]) -> str:
  """`loss_cfg["name"]`. The skeleton (configs/common.py) names the loss; a loss section
  without a name (configs written before the key joined the skeleton) is SegViT's ATM loss."""
  return loss_cfg.get("name", "atm")


def get_loss(loss_cfg: Mapping[str, Any]) -> tuple[Loss, dict[str, Any]]:
  """(the Loss `loss_name(loss_cfg)` names, the rest of `loss_cfg`: its options, without the
  `SHARED_OPTIONS` it does not take). A shared option it takes must be there."""
  options = dict(loss_cfg)
  name = loss_name(options)
  options.pop("name", None)
  if name not in LOSSES:
    raise ValueError(f"config.loss.name={name!r}: expected one of {', '.join(LOSSES)}")
  loss = LOSSES[name]
  for key in SHARED_OPTIONS:
    if key not in loss.shared_options:
      options.pop(key, None)
    elif key not in options:
      raise ValueError(f"config.loss has no {key!r}, which loss {name!r} needs (the skeleton, "
                       f"configs/common.py, documents it; a config that replaces the loss "
                       f"section must state it)")
  return loss, options


__all__ = ["LOSSES", "Loss", "SHARED_OPTIONS", "atm_loss", "get_loss", "loss_name",
           "mask2former_panoptic_loss", "mask2former_semantic_loss", "pixel_ce_loss"]
