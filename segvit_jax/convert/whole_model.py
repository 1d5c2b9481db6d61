"""What the whole-model layouts (`segvit_official.py`, `segformer.py`, `eomt.py`) share around
their key tables: our config of the model (`--config`), the model's abstract variables for the
strict check of every converted tensor, the class names of bundles and exports, the test
protocol a converted bundle records, and the loss's class-weight buffer the mask-classification
releases hold (DETR-style set criteria: `empty_weight`)."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from segvit_jax import bundle, config_utils
from segvit_jax.data import palettes, registry
from segvit_jax.models import build_model


def load_config(config: ml_collections.ConfigDict | str) -> ml_collections.ConfigDict:
  """A ConfigDict as it is, or the one 'configs/X.py[:ARG]' gives."""
  return config_utils.load_config(config) if isinstance(config, str) else config


def eval_protocol(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """The config's test protocol, its whole `eval` section, as plain JSON data (tuples become
  lists), for a converted bundle's config.json: evaluation then runs the bundle as the config
  says (resize, windows, scales). None when the config has no `eval` section."""
  section = config.get("eval")
  return None if section is None else json.loads(json.dumps(section.to_dict()))


def with_recorded(config: ml_collections.ConfigDict | str | None) -> tuple[
    ml_collections.ConfigDict | None, dict[str, Any]]:
  """`config` (None, a ConfigDict or 'configs/X.py[:ARG]') loaded, and the entries of
  config.json a bundle converted with it records: `options.config` (the spec, when given as
  one) and `eval` (`eval_protocol`). Without a config: (None, {}), nothing recorded (evaluation
  then falls back to whole-image inference)."""
  if config is None:
    return None, {}
  extra: dict[str, Any] = {"options": {"config": config}} if isinstance(config, str) else {}
  config = load_config(config)
  protocol = eval_protocol(config)
  if protocol is not None:
    extra["eval"] = protocol
  return config, extra


def no_object_weight(meta: Mapping[str, Any], default: float) -> float:
  """The loss's no-object class weight of a bundle (its config.json `meta`): the one its
  `loss` section records, else `default` (the release's)."""
  loss = meta.get("loss")
  if isinstance(loss, Mapping) and loss.get("no_object_weight") is not None:
    return float(loss["no_object_weight"])
  return default


def class_weights(num_classes: int, no_object: float) -> np.ndarray:
  """(num_classes + 1,) float32: a set criterion's `empty_weight` buffer, ones with the
  no-object weight `no_object` last (DETR's SetCriterion, inherited by SegViT's ATM loss and
  Mask2Former's)."""
  weights = np.ones(num_classes + 1, np.float32)
  weights[-1] = no_object
  return weights


def abstract_variables(model_cfg: Mapping[str, Any]) -> dict:
  """The variables of the model `model_cfg` describes, {collection: tree of float32
  ShapeDtypeStructs} (`bundle.probe_input`)."""
  model, x = build_model(model_cfg), bundle.probe_input(model_cfg)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  # Shapes from the boxes directly: unboxing would apply sharding constraints under a mesh.
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(getattr(v, "value", v).shape, jnp.float32),
                      flax.core.unfreeze(abstract),
                      is_leaf=lambda v: isinstance(v, flax.linen.meta.AxisMetadata))


def class_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The class names of `config.dataset` for bundles and the exports' meta
  (`registry.class_names`: without reading the data where the dataset is known, else the
  source's, e.g. a folder's classes.txt), else class_0, class_1, ..."""
  ds, k = config.dataset, config.model.num_classes
  names = None
  try:
    names = registry.class_names(ds)
  except (FileNotFoundError, ValueError, ImportError) as e:
    logging.warning("class names of dataset %r unavailable (%s): using class_0..class_%d",
                    ds.name, e, k - 1)
  if names is None or len(names) != k:
    return tuple(f"class_{i}" for i in range(k))
  return tuple(names)


def labels(meta: Mapping[str, Any]) -> list[str]:
  """A bundle's class names (its config.json `meta`), else class_0, class_1, ..."""
  k = meta["model"]["num_classes"]
  names = list(meta.get("class_names") or [])
  return names if len(names) == k else [f"class_{i}" for i in range(k)]


def palette(names: Sequence[str]) -> list[list[int]]:
  """Class colours for an export's meta (mmseg's init_segmentor reads meta['PALETTE']): those
  of eval's pictures (`palettes.palette_for_class_names`)."""
  return palettes.palette_for_class_names(names).tolist()
