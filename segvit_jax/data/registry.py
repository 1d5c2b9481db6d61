"""The table of datasets: `config.dataset.name` -> the module that reads it.

Every source has `class_names` (a tuple of str) and is a grain random-access source of records
`dict(image=uint8 (H, W, 3) RGB, label=uint8 (H, W), name=str)` with labels in train ids
(classes 0..K-1, `ignore_index` 255 ignored); panoptic datasets (`coco_panoptic.py`) yield
masks and class ids instead of a label. Each dataset's layout is in its module's docstring.

  synthetic         `synthetic.py`, the built-in procedural set, no files
  ade20k            `ade20k.py`, mmseg's ADEChallengeData2016 layout
  folder            `folder.py`, root/images, root/annotations, root/classes.txt
  coco_stuff10k     `coco_stuff.py`, mmseg's layout (written from the raw release by it)
  pascal_context    `pascal_context.py`, 60 classes (background a class)
  pascal_context59  the same files, 59 classes (background ignored)
  cityscapes        `cityscapes.py`, gtFine labelTrainIds or labelIds
  tfds_ade20k       `tfds.py`, prepared TFDS scene_parse150 (thing classes only)
  tfds_cityscapes   `tfds.py`, prepared TFDS cityscapes/semantic_segmentation
  coco_panoptic     `coco_panoptic.py`, COCO panoptic 2017 (for EoMT)
  ade20k_panoptic   `ade20k_panoptic.py`, Mask2Former's json or the EoMT release's pngs
  coco_instance     `coco_instance.py`, COCO instances 2017 (for EoMT; masks may overlap)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from segvit_jax.data import (ade20k, ade20k_panoptic, cityscapes, coco_instance, coco_panoptic,
                             coco_stuff, folder, pascal_context, synthetic, tfds)

# Dataset name -> builder(dataset_cfg, split) -> source.
DATASETS: dict[str, Callable[[Any, str], Any]] = {
    "synthetic": synthetic.build,
    "ade20k": ade20k.build,
    "folder": folder.build,
    "coco_stuff10k": coco_stuff.build,
    "pascal_context": pascal_context.build,
    "pascal_context59": pascal_context.build59,
    "cityscapes": cityscapes.build,
    "tfds_ade20k": tfds.build_ade20k,
    "tfds_cityscapes": tfds.build_cityscapes,
    "coco_panoptic": coco_panoptic.build,
    "ade20k_panoptic": ade20k_panoptic.build,
    "coco_instance": coco_instance.build,
}

# Dataset name -> its class names from `config.dataset` alone (no data read), where they are
# fixed: every dataset but the folder (classes.txt) and COCO panoptic / instances (the json's
# categories).
KNOWN_CLASS_NAMES: dict[str, Callable[[Any], tuple[str, ...]]] = {
    "synthetic": lambda dataset_cfg: synthetic.CLASS_NAMES,
    "ade20k": ade20k.config_class_names,
    "coco_stuff10k": lambda dataset_cfg: coco_stuff.COCO_STUFF_CLASSES,
    "pascal_context": lambda dataset_cfg: pascal_context.PASCAL_CONTEXT_CLASSES,
    "pascal_context59": lambda dataset_cfg: pascal_context.PASCAL_CONTEXT59_CLASSES,
    "cityscapes": lambda dataset_cfg: cityscapes.CITYSCAPES_CLASSES,
    "tfds_ade20k": lambda dataset_cfg: ade20k.ADE20K_CLASSES,
    "tfds_cityscapes": lambda dataset_cfg: cityscapes.CITYSCAPES_CLASSES,
    "ade20k_panoptic": lambda dataset_cfg: ade20k_panoptic.CATEGORIES.names,
}


def _check_name(name: str) -> None:
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def get_source(dataset_cfg, split: str):
  """The source for `config.dataset` and a split name ("train" / "val" or the folder's name).

  For "synthetic", the split equal to `dataset_cfg.train_split` has `num_train` examples and any
  other `num_eval`. Checks that `dataset_cfg.num_classes` matches the dataset's class list.
  """
  name = dataset_cfg.name
  _check_name(name)
  source = DATASETS[name](dataset_cfg, split)
  num_classes = dataset_cfg.num_classes
  if num_classes is not None and num_classes != len(source.class_names):
    raise ValueError(f"config.dataset.num_classes is {num_classes} but dataset {name!r} has "
                     f"{len(source.class_names)} classes")
  return source


def class_names(dataset_cfg) -> tuple[str, ...]:
  """The class names the dataset of `dataset_cfg` has, without reading data where the dataset
  fixes them (`KNOWN_CLASS_NAMES`; ADE20K without reduce_zero_label has "other" first), else
  from the source of `dataset_cfg.eval_split`: a folder's classes.txt, COCO panoptic's json.
  Unlike `get_source`, whatever `dataset_cfg.num_classes` says (the caller compares). Raises
  what building the source raises (FileNotFoundError, ValueError)."""
  name = dataset_cfg.name
  _check_name(name)
  if name in KNOWN_CLASS_NAMES:
    return tuple(KNOWN_CLASS_NAMES[name](dataset_cfg))
  return tuple(DATASETS[name](dataset_cfg, dataset_cfg.eval_split).class_names)
