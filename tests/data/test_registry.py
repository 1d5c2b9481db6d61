"""Tests for segvit_jax.data.registry: the table of datasets and `class_names`, which gives a
dataset's class names without reading data where the dataset fixes them."""

import pytest

from segvit_jax.data import ade20k, cityscapes, coco_stuff, pascal_context, registry, synthetic
from tests import fabricate, support


def _cfg(**kw):
  return support.dataset_config(**kw)


# A root that does not exist: reading any file there would raise FileNotFoundError.
_NOWHERE = "/nonexistent/segvit_jax_registry_test"


@pytest.mark.parametrize("name, reduce_zero, expected", [
    ("synthetic", False, synthetic.CLASS_NAMES),
    ("ade20k", True, ade20k.ADE20K_CLASSES),
    ("ade20k", False, ("other",) + ade20k.ADE20K_CLASSES),
    ("coco_stuff10k", False, coco_stuff.COCO_STUFF_CLASSES),
    ("pascal_context", False, pascal_context.PASCAL_CONTEXT_CLASSES),
    ("pascal_context59", False, pascal_context.PASCAL_CONTEXT_CLASSES[1:]),
    ("cityscapes", False, cityscapes.CITYSCAPES_CLASSES),
    ("tfds_ade20k", False, ade20k.ADE20K_CLASSES),
    ("tfds_cityscapes", False, cityscapes.CITYSCAPES_CLASSES),
])
def test_class_names_of_known_datasets_read_no_data(name, reduce_zero, expected):
  names = registry.class_names(_cfg(name=name, root=_NOWHERE, reduce_zero_label=reduce_zero))
  assert names == tuple(expected) and isinstance(names, tuple)
  assert len(names) == {"synthetic": 6, "ade20k": 150 if reduce_zero else 151,
                        "coco_stuff10k": 171, "pascal_context": 60, "pascal_context59": 59,
                        "cityscapes": 19, "tfds_ade20k": 150, "tfds_cityscapes": 19}[name]


def test_known_class_names_match_the_sources(tmp_path):
  # ADE20K: the same names with and without reduce_zero_label as the source reads.
  root = str(tmp_path / "ADEChallengeData2016")
  fabricate.ade20k(root, num_train=1, num_val=1)
  for reduce_zero in (True, False):
    cfg = _cfg(name="ade20k", root=root, reduce_zero_label=reduce_zero,
               num_classes=150 if reduce_zero else 151)
    assert registry.class_names(cfg) == registry.get_source(cfg, "val").class_names
  # With the skeleton's default (reduce_zero_label False): label 0 is "other".
  assert registry.class_names(_cfg(name="ade20k", root=root))[:2] == ("other", "wall")
  cfg = _cfg(name="synthetic", num_train=2, num_eval=2, image_size=32, train_split="train")
  assert registry.class_names(cfg) == registry.get_source(cfg, "val").class_names


def test_class_names_read_the_folder_and_coco_panoptic_files(tmp_path):
  assert set(registry.DATASETS) - set(registry.KNOWN_CLASS_NAMES) == {"folder", "coco_panoptic",
                                                                      "coco_instance"}
  root = str(tmp_path / "mydata")
  fabricate.image_file(f"{root}/images/val/a.png", 2, 2)
  fabricate.label_file(f"{root}/annotations/val/a.png", [[0, 1], [1, 0]])
  fabricate.lines_file(f"{root}/classes.txt", ["sky", "road"])
  assert registry.class_names(_cfg(name="folder", root=root)) == ("sky", "road")
  assert registry.class_names(_cfg(name="folder", root=root, eval_split="val")) == ("sky", "road")
  with pytest.raises(FileNotFoundError, match="images/test"):
    registry.class_names(_cfg(name="folder", root=root, eval_split="test"))
  coco = fabricate.write_coco_panoptic(str(tmp_path / "coco"), num_train=1, num_val=1, size=32)
  names = registry.class_names(_cfg(name="coco_panoptic", root=coco))
  assert names == tuple(c["name"] for c in fabricate.coco_categories())


def test_class_names_of_an_unknown_dataset_lists_the_known_ones():
  with pytest.raises(ValueError, match="unknown dataset 'imagenet'; known: synthetic, ade20k, "
                     "folder, coco_stuff10k"):
    registry.class_names(_cfg(name="imagenet"))
