"""Sources over PREPARED TensorFlow Datasets data, read without TensorFlow (README, "Datasets").

TFDS random access (`builder.as_data_source`) reads array_record files written by
`tfds build ... --file_format=array_record` and decodes the features with PIL, so grain can use it
like any other source. Records are those of every source (`files.py`): dict(image=uint8
(H, W, 3), label=uint8 (H, W) in train ids with 255 ignored, name=str).

  tfds_ade20k      TFDS `scene_parse150` (v1.0.0). Its builder packs the 2017 challenge's
                   INSTANCE annotations (`annotations_instance.tar`), not the 150-class semantic
                   maps: the RGB annotation's R channel is a category of the 100-class instance
                   task (0 = none), G the instance id. R is mapped to the SceneParse150 ids with
                   the official instance -> scene-parsing table (`ADE20K_INSTANCE_TO_SEMANTIC`),
                   then 0 -> 255 and v -> v - 1. Only these 100 "thing" classes are ever labelled:
                   the 50 others (wall, floor, sky, ...) are never annotated here and come out as
                   255, so mIoU on this source is not the ADE20K-150 benchmark number (use the
                   `ade20k` folder source for that). TFDS "test" is the ADE validation set.
  tfds_cityscapes  TFDS `cityscapes/semantic_segmentation` (v1.0.0): `segmentation_label` holds
                   the raw gtFine labelIds (0..33), mapped to the 19 train ids with the official
                   cityscapesScripts table (others -> 255).

Our split names map to TFDS's: tfds_ade20k train -> "train", val -> "test"; tfds_cityscapes
train -> "train", val -> "validation". Any other name (e.g. "train[:100]") goes to TFDS as is.

`config.dataset.root` is the TFDS data_dir holding the prepared dataset (e.g. ~/tensorflow_datasets
with scene_parse150/1.0.0/*.array_record-*). A missing or unprepared directory, or one prepared
as tfrecord (no random access), raises FileNotFoundError / ValueError naming the directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import numpy as np

from segvit_jax.data import ade20k, cityscapes, files

# ADE20K instance-task category k (1..100, placeschallenge instanceInfo100) is SceneParse150
# class ADE20K_INSTANCE_TO_SEMANTIC[k - 1] (1-based; CSAILVision's instance -> scene-parsing
# category mapping, as used by Mask2Former's ade20k_instance_catid_mapping.txt).
ADE20K_INSTANCE_TO_SEMANTIC = (
    8, 9, 11, 13, 15, 16, 19, 20, 21, 23, 24, 25, 28, 31, 32, 33, 34, 36, 37, 38, 39, 40, 42, 43,
    44, 45, 46, 48, 50, 51, 54, 56, 57, 58, 59, 63, 65, 66, 67, 68, 70, 71, 72, 73, 74, 75, 76, 77,
    79, 81, 82, 83, 84, 86, 87, 88, 89, 90, 91, 93, 94, 96, 98, 99, 103, 104, 105, 108, 109, 111,
    112, 113, 116, 117, 119, 120, 121, 122, 124, 125, 126, 127, 128, 130, 131, 133, 134, 135, 136,
    137, 138, 139, 140, 143, 144, 145, 147, 148, 149, 150,
)
assert len(ADE20K_INSTANCE_TO_SEMANTIC) == 100
# The same as {R value: train id} (instance category k -> 150-class id - 1).
_ADE20K_R_TO_TRAINID = {k + 1: v - 1 for k, v in enumerate(ADE20K_INSTANCE_TO_SEMANTIC)}

ADE20K_TFDS_NAME = "scene_parse150"
CITYSCAPES_TFDS_NAME = "cityscapes/semantic_segmentation"
ADE20K_TFDS_SPLITS = {"train": "train", "val": "test"}
CITYSCAPES_TFDS_SPLITS = {"train": "train", "val": "validation"}

_PREPARE_HINTS = {
    ADE20K_TFDS_NAME: "tfds build scene_parse150 --data_dir={root} --file_format=array_record",
    CITYSCAPES_TFDS_NAME: (
        "tfds build cityscapes/semantic_segmentation --data_dir={root} --file_format=array_record "
        "--manual_dir=DIR (DIR holding leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip)"),
}


# ----------------------------------------------------------------------------------------------
# Label conversions (pure functions).


def ade20k_label_from_instance_annotation(annotation: np.ndarray,
                                          ignore_index: int = 255) -> np.ndarray:
  """ADE20K instance annotation (H, W, 3) RGB -> SceneParse150 train ids (H, W) uint8.

  R = instance-task category 1..100 (0 = not annotated -> ignore_index), mapped to the 150-class
  ids 0..149. Raises ValueError on an R value above 100.
  """
  category = annotation[..., 0]
  if category.max(initial=0) > len(ADE20K_INSTANCE_TO_SEMANTIC):
    bad = np.unique(category[category > len(ADE20K_INSTANCE_TO_SEMANTIC)])
    raise ValueError(f"instance category id(s) {', '.join(str(int(v)) for v in bad[:10])} "
                     f"outside 0..{len(ADE20K_INSTANCE_TO_SEMANTIC)} in the R channel")
  return files.lookup_table(_ADE20K_R_TO_TRAINID, ignore_index)[category]


def as_rgb(image: np.ndarray) -> np.ndarray:
  """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (H, W, 3) (grey repeated, alpha dropped).

  TFDS stores the original file bytes, so a greyscale JPEG decodes with one channel.
  """
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def _ade20k_record(example: dict, name: str, ignore_index: int) -> dict:
  image = as_rgb(example["image"])
  label = ade20k_label_from_instance_annotation(example["annotation"], ignore_index)
  return dict(image=image, label=label, name=name)


def _cityscapes_record(example: dict, name: str, ignore_index: int) -> dict:
  del name  # the record carries the Cityscapes image id
  image_id = example["image_id"]
  image_id = image_id.decode("utf-8") if isinstance(image_id, bytes) else str(image_id)
  label = example["segmentation_label"]
  label = label[..., 0] if label.ndim == 3 else label
  return dict(image=as_rgb(example["image_left"]),
              label=cityscapes.cityscapes_to_train_ids(label, ignore_index), name=image_id)


# ----------------------------------------------------------------------------------------------
# Source.


class TfdsSegmentation:
  """grain RandomAccessDataSource over a TFDS random-access source.

  `convert(example, name, ignore_index) -> record` is a module-level function (the source is
  pickled into grain workers). Records without an id in TFDS are named
  `{tfds_name}_{tfds_split}_{index:06d}`; TFDS shuffles examples when it writes them, so index
  order is not the original file order.
  """

  def __init__(self, data_source, convert: Callable[[dict, str, int], dict],
               class_names, tfds_name: str, tfds_split: str, data_dir: str,
               ignore_index: int = 255):
    self.data_source = data_source
    self.convert = convert
    self.class_names = tuple(class_names)
    self.tfds_name = tfds_name
    self.tfds_split = tfds_split
    self.data_dir = data_dir
    self.ignore_index = ignore_index

  def __len__(self) -> int:
    return len(self.data_source)

  def _name(self, index: int) -> str:
    return f"{self.tfds_name.split('/')[0]}_{self.tfds_split}_{index:06d}"

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {self!r}")
    name = self._name(index)
    where = (f"example {index} ({name}) of TFDS {self.tfds_name}:{self.tfds_split} in "
             f"{self.data_dir}")
    try:
      record = self.convert(self.data_source[index], name, self.ignore_index)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from e
    if record["label"].shape != record["image"].shape[:2]:
      raise ValueError(f"{where}: label is {record['label'].shape} but image is "
                       f"{record['image'].shape[:2]} (H, W)")
    files.check_label(record["label"], len(self.class_names), self.ignore_index, where)
    return record

  def __repr__(self) -> str:
    return (f"TfdsSegmentation({self.tfds_name}:{self.tfds_split}, {len(self)} examples, "
            f"{len(self.class_names)} classes)")


def _load_builder(tfds_name: str, data_dir: str):
  """The TFDS builder of `tfds_name` prepared as array_record in data_dir, or a clear error."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow, optional)
  hint = _PREPARE_HINTS.get(tfds_name, f"tfds build {tfds_name} --data_dir={{root}} "
                                       "--file_format=array_record").format(root=data_dir)
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(
        f"missing TFDS data_dir {data_dir}; point --config.dataset.root at the directory holding "
        f"the prepared {tfds_name} (prepare it with `{hint}`, or builder.download_and_prepare, "
        "on a machine with internet, then copy the data_dir here)")
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {tfds_name} is not prepared in data_dir {data_dir}: searched "
        f"{builder.data_dir} (no dataset_info.json). Prepare it with `{hint}` (or "
        "builder.download_and_prepare(file_format='array_record')) on a machine with internet, "
        "then copy the data_dir here")
  file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
  if file_format not in ("array_record", "parquet"):
    raise ValueError(
        f"TFDS dataset {tfds_name} in {builder.data_dir} is stored as {file_format}, which has "
        f"no random access without TensorFlow; prepare it again with `{hint}` (or convert it "
        "with `tfds convert_format --out_file_format=array_record`)")
  return builder


def tfds_source(tfds_name: str, data_dir: str, split: str, split_map: Mapping[str, str],
                convert: Callable[[dict, str, int], dict], class_names,
                ignore_index: int = 255) -> TfdsSegmentation:
  """A `TfdsSegmentation` over split (our name, mapped by split_map, or a TFDS split string)."""
  builder = _load_builder(tfds_name, data_dir)
  tfds_split = split_map.get(split, split)
  available = list(builder.info.splits.keys())
  if not any(c in tfds_split for c in "[+") and tfds_split not in available:
    raise ValueError(f"TFDS dataset {tfds_name} in {builder.data_dir} has no split "
                     f"{tfds_split!r} (asked for {split!r}); it has {available}; our names: "
                     f"{dict(split_map)}")
  data_source = builder.as_data_source(split=tfds_split)
  return TfdsSegmentation(data_source, convert, class_names, tfds_name, tfds_split,
                          os.fspath(builder.data_dir), ignore_index)


def ade20k_tfds_source(data_dir: str, split: str, ignore_index: int = 255) -> TfdsSegmentation:
  """ADE20K from TFDS `scene_parse150` (thing classes only, see the module docstring)."""
  return tfds_source(ADE20K_TFDS_NAME, data_dir, split, ADE20K_TFDS_SPLITS, _ade20k_record,
                     ade20k.ADE20K_CLASSES, ignore_index)


def cityscapes_tfds_source(data_dir: str, split: str,
                           ignore_index: int = 255) -> TfdsSegmentation:
  """Cityscapes (19 classes) from TFDS `cityscapes/semantic_segmentation`."""
  return tfds_source(CITYSCAPES_TFDS_NAME, data_dir, split, CITYSCAPES_TFDS_SPLITS,
                     _cityscapes_record, cityscapes.CITYSCAPES_CLASSES, ignore_index)


def _data_dir(dataset_cfg) -> str:
  return files.dataset_root(
      dataset_cfg, f"the TFDS data_dir holding the prepared {dataset_cfg.name} data")


def build_ade20k(dataset_cfg, split: str) -> TfdsSegmentation:
  """The "tfds_ade20k" source of `config.dataset` (root = the TFDS data_dir, ignore_index)."""
  return ade20k_tfds_source(_data_dir(dataset_cfg), split, dataset_cfg.ignore_index)


def build_cityscapes(dataset_cfg, split: str) -> TfdsSegmentation:
  """The "tfds_cityscapes" source of `config.dataset` (root = the TFDS data_dir, ignore_index)."""
  return cityscapes_tfds_source(_data_dir(dataset_cfg), split,
                                dataset_cfg.ignore_index)
