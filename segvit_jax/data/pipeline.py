"""grain input pipelines for training and evaluation.

Train: `MapDataset.source -> shard by JAX process -> seed -> shuffle -> repeat -> augment ->
batch -> to_iter_dataset [-> mp_prefetch]`. Every random number comes from grain's per-element
generators, so a (config, process) pair always yields the same batches, and the iterator's
`get_state()` / `set_state()` resume at the exact batch.

The augmentation is `config.augment.pipeline`: "segvit" (mmseg's, SegViT Sec. 4.2) or "eomt"
(colour jitter, flip, scale jitter, pad, random crop; EoMT App. A.2, "Augmentation.").

Panoptic datasets (`coco_panoptic.PANOPTIC_DATASETS`) train with the "eomt" pipeline on a
segment-index map (`transforms.segment_map`): batches carry `label` (B, H, W) int32 = the index
of the pixel's segment, `config.dataset.ignore_index` on void, crowd and padding pixels, and
`segment_classes` (B, config.dataset.max_segments) int32 = each segment's contiguous class id,
-1 for padding and for segments the augmentation left without a pixel. Their loss must read
`segment_classes` (`mask2former_panoptic`). Datasets whose masks overlap (COCO instances) set
`config.dataset.mask_layers` L > 1: `label` is then (B, H, W, L), L such maps whose union per
index is each mask (`transforms.segment_map`).

Bad examples (`config.dataset.skip_bad_examples`): by default an example whose read raises (the
sources raise ValueError naming the file for an undecodable image, a size mismatch or an
out-of-range label) stops the run with that error. With skipping on, the source is wrapped in
`SkipBadExamples`, which logs a warning naming the file and the reason the first time a process
meets it, counts it (`skipped_examples()`, per process) and returns None; the pipeline then
batches after `to_iter_dataset`, which drops the Nones, so batches stay full, and the iterator
state (the index of the next element) still resumes exactly. In that mode each grain worker
process batches its own slice of the element stream, so the batches depend on
`dataset.num_workers` (still deterministic for a given config), and the counts of skips made in
worker processes are in their log lines, not in the main process's `skipped_examples()`.
`python -m segvit_jax.data.check` lists every bad file up front.

Eval: a `MapDataset` of per-example records (keep-ratio resized, normalised image; label at the
original resolution), sharded by JAX process. Panoptic / instance evaluation
(`make_panoptic_eval_dataset`) keeps each image's ground truth as a segment map with per-segment
classes and crowd flags instead of a label map (a mask stack where masks overlap).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any

import grain
import numpy as np
from absl import logging

from segvit_jax.data import coco_panoptic, registry
from segvit_jax.data import transforms as T

AUGMENT_PIPELINES = ("segvit", "eomt")
# With skip_bad_examples, the share of skipped reads (per window of 1000) that stops the run.
MAX_BAD_RATIO = 0.9
# What reading a bad example raises: the sources turn decoding, size and label-range problems
# into ValueError naming the file; OSError covers a file that vanished or cannot be opened.
BAD_EXAMPLE_ERRORS = (ValueError, OSError)


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


def _process_seed(seed: int, process_index: int) -> int:
  # Each process shuffles and augments its own shard; a per-process seed keeps element i of
  # different shards from drawing the same augmentation.
  if process_index == 0:
    return int(seed)
  return int(np.random.SeedSequence([int(seed), process_index]).generate_state(1)[0])


def _ensure_absl_flags_parsed() -> None:
  # grain worker processes read absl flags and fail with UnparsedFlagAccessError otherwise
  # (grain's multiprocessing reads them).
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# ----------------------------------------------------------------------------------------------
# Skipping bad examples.


def example_file(source, index: int) -> str:
  """What to call example `index` of `source` in messages: its image file for file-backed
  sources (those with `pairs` of (image, label) paths), else "example INDEX"."""
  pairs = getattr(source, "pairs", None)
  if pairs is not None:
    return str(pairs[int(index)][0])
  return f"example {int(index)}"


_skip_lock = threading.Lock()
_skipped = collections.Counter()  # example file -> times skipped in this process


def skipped_examples() -> dict[str, int]:
  """Examples `SkipBadExamples` skipped in this process so far: file -> number of reads skipped
  (a bad file is met again every epoch; prefetching may read ahead of the batches returned)."""
  with _skip_lock:
    return dict(_skipped)


class SkipBadExamples:
  """grain random-access source wrapper: `source[i]`, or None if reading it raises one of
  `BAD_EXAMPLE_ERRORS` (logged once per file and process, counted every time). ValueError once
  every example has failed (there is nothing to skip to)."""

  def __init__(self, source):
    self.source = source
    self.class_names = source.class_names
    self._bad_indices = set()

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int):
    try:
      return self.source[index]
    except BAD_EXAMPLE_ERRORS as e:
      name = example_file(self.source, index)
      with _skip_lock:
        first = name not in _skipped
        _skipped[name] += 1
        distinct = len(_skipped)
        self._bad_indices.add(int(index))
        all_bad = len(self._bad_indices) == len(self.source)
      if all_bad:
        raise ValueError(f"all {len(self.source)} examples of {self.source!r} failed to read "
                         f"(the last: {e}); check the dataset with `python -m "
                         "segvit_jax.data.check`") from e
      if first:
        logging.warning("skipping bad example %s (config.dataset.skip_bad_examples; %d bad "
                        "example(s) met in this process): %s", name, distinct, e)
      return None

  def __repr__(self) -> str:
    return f"SkipBadExamples({self.source!r})"


# ----------------------------------------------------------------------------------------------
# Transforms.


def is_panoptic(config) -> bool:
  """Whether `config.dataset` yields panoptic records (trained on segment-index maps)."""
  return config.dataset.name in coco_panoptic.PANOPTIC_DATASETS


def max_segments(config) -> int:
  """`config.dataset.max_segments` of a panoptic config: segments per training image."""
  n = config.dataset.max_segments
  if not n or int(n) < 1:
    raise ValueError(f"dataset {config.dataset.name!r} is panoptic: set config.dataset."
                     f"max_segments (segments per training image, e.g. 100 for COCO)")
  return int(n)


def mask_layers(config) -> int:
  """`config.dataset.mask_layers`: segment-index layers of a panoptic training label (>= 1)."""
  n = config.dataset.get("mask_layers", 1)
  if int(n) < 1:
    raise ValueError(f"config.dataset.mask_layers={n} must be at least 1 (1: one segment-index "
                     "map; more: overlapping instances, e.g. COCO instances)")
  return int(n)


def train_transforms(config) -> list:
  """The train augmentation `config.augment.pipeline` ("segvit" or "eomt") as grain transforms."""
  name = config.augment.pipeline
  if is_panoptic(config):
    if name != "eomt":
      raise ValueError(f"dataset {config.dataset.name!r} is panoptic: it trains with "
                       f"config.augment.pipeline='eomt', not {name!r}")
    return eomt_panoptic_train_transforms(config)
  if name == "segvit":
    return segvit_train_transforms(config)
  if name == "eomt":
    return eomt_train_transforms(config)
  raise ValueError(f"unknown config.augment.pipeline {name!r}; known: "
                   f"{', '.join(AUGMENT_PIPELINES)}")


def segvit_train_transforms(config) -> list:
  """The mmseg train augmentation for `config.augment` as a list of grain transforms."""
  aug = config.augment
  crop = tuple(aug.crop_size)
  ops = [
      T.RandomResize(scale=tuple(aug.scale), ratio_range=tuple(aug.ratio_range)),
      T.RandomCrop(crop_size=crop, cat_max_ratio=aug.cat_max_ratio,
                   ignore_index=config.dataset.ignore_index),
      T.RandomFlip(prob=aug.flip_prob),
  ]
  if aug.photometric:
    ops.append(T.PhotoMetricDistortion(
        brightness_delta=aug.photometric_brightness,
        contrast_range=tuple(aug.photometric_contrast),
        saturation_range=tuple(aug.photometric_saturation), hue_delta=aug.photometric_hue))
  ops += [
      T.Normalize(mean=tuple(config.mean), std=tuple(config.std)),
      T.Pad(size=crop, pad_value=0.0, label_pad_value=config.dataset.ignore_index),
      T.Format(keys=("image", "label")),
  ]
  return ops


def eomt_train_transforms(config) -> list:
  """EoMT's train augmentation (EoMT App. A.2, "Augmentation."), in EoMT's order: colour jitter
  (if `augment.color_jitter`) on the full image, horizontal flip, scale jitter of the crop size
  by a factor in `augment.scale_jitter`, pad to the crop (image 0 before normalising, i.e. black;
  label ignore_index), random crop to `augment.crop_size`, normalise."""
  return [
      *_eomt_color_jitter(config),
      *_eomt_geometric(config),
      T.Normalize(mean=tuple(config.mean), std=tuple(config.std)),
      T.Format(keys=("image", "label")),
  ]


def eomt_panoptic_train_transforms(config) -> list:
  """EoMT's train augmentation on panoptic records: the record's masks become a segment-index
  map (`T.PanopticTargets`), then the steps of `eomt_train_transforms` (colour jitter if
  `augment.color_jitter`, off for COCO), the geometric ones in `T.PanopticAugment` (segments
  left without a pixel become invalid; redrawn if none is left), normalise."""
  return [
      T.PanopticTargets(max_segments=max_segments(config),
                        ignore_index=config.dataset.ignore_index,
                        mask_layers=mask_layers(config)),
      *_eomt_color_jitter(config),
      T.PanopticAugment(ops=tuple(_eomt_geometric(config))),
      T.Normalize(mean=tuple(config.mean), std=tuple(config.std)),
      T.Format(keys=("image", "label", "segment_classes")),
  ]


def _eomt_color_jitter(config) -> list:
  aug = config.augment
  if not aug.color_jitter:
    return []
  return [T.ColorJitter(brightness=aug.jitter_brightness, contrast=aug.jitter_contrast,
                        saturation=aug.jitter_saturation, hue=aug.jitter_hue)]


def _eomt_geometric(config) -> list:
  aug = config.augment
  crop = tuple(aug.crop_size)
  ignore = config.dataset.ignore_index
  return [
      T.RandomFlip(prob=aug.flip_prob),
      T.ScaleJitter(target_size=crop, scale_range=tuple(aug.scale_jitter)),
      T.Pad(size=crop, pad_value=0, label_pad_value=ignore),
      T.RandomCrop(crop_size=crop, cat_max_ratio=1.0, ignore_index=ignore),
  ]


def eval_transforms(config) -> list:
  """Test-time resize at every multi-scale ratio (`config.eval.resize`, `scale`, `scales`);
  normalisation happens on the device (`segvit_jax.evaluation`)."""
  return [T.MultiScaleResize.from_config(config.eval)]


def apply_transforms(ds: grain.MapDataset, ops) -> grain.MapDataset:
  for op in ops:
    ds = ds.random_map(op) if isinstance(op, grain.transforms.RandomMap) else ds.map(op)
  return ds


def per_process_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(f"config.batch_size {batch_size} is not divisible by the number of JAX "
                     f"processes {process_count}")
  return batch_size // process_count


def train_batch_spec(config) -> dict[str, tuple[tuple[int, ...], Any]]:
  """The per-example layout of a training batch: key -> (shape without the batch axis,
  dtype), what `make_train_dataset` yields (batched) and the trainer compiles for."""
  h, w = config.augment.crop_size
  spec = {"image": ((h, w, 3), np.float32), "label": ((h, w), np.int32)}
  if is_panoptic(config):
    spec["segment_classes"] = ((max_segments(config),), np.int32)
    if mask_layers(config) > 1:
      spec["label"] = ((h, w, mask_layers(config)), np.int32)
  check_loss_reads_targets(config)
  return spec


def check_loss_reads_targets(config) -> None:
  """ValueError unless `config.loss` fits the data: a loss needing batch entries the dataset
  does not yield, or a semantic loss on panoptic segment-index maps (it would take segment
  indices for classes)."""
  if config.get("loss") is None:
    return
  from segvit_jax import losses  # pylint: disable=g-import-not-at-top  (jax; not in workers)
  loss, _ = losses.get_loss(config.loss)
  name = losses.loss_name(config.loss)
  keys = {"image", "label"} | ({"segment_classes"} if is_panoptic(config) else set())
  missing = [k for k in loss.batch_keys if k not in keys]
  if missing:
    raise ValueError(f"config.loss.name={name!r} needs the batch entries {missing}, which "
                     f"dataset {config.dataset.name!r} does not yield (panoptic datasets: "
                     f"{', '.join(sorted(coco_panoptic.PANOPTIC_DATASETS))})")
  if is_panoptic(config) and "segment_classes" not in loss.batch_keys:
    raise ValueError(f"dataset {config.dataset.name!r} trains on segment-index maps: "
                     f"config.loss.name must be a panoptic loss that reads segment_classes "
                     f"('mask2former_panoptic'), not {name!r}")


def make_train_dataset(config, process_index: int | None = None,
                       process_count: int | None = None) -> grain.IterDataset:
  """The infinite training `IterDataset` of this process's batches.

  Batches: image float32 (B, crop_h, crop_w, 3) normalised, label int32 (B, crop_h, crop_w) with
  ignore_index in padding; B = config.batch_size // process_count. Panoptic datasets: label is
  the segment-index map ((B, crop_h, crop_w, L) with mask_layers L > 1), plus segment_classes
  int32 (B, max_segments) (module docstring).
  """
  process_index, process_count = _process_layout(process_index, process_count)
  batch = per_process_batch_size(config.batch_size, process_count)
  check_loss_reads_targets(config)
  source = registry.get_source(config.dataset, config.dataset.train_split)
  if is_panoptic(config) and hasattr(source, "check_max_segments"):
    source.check_max_segments(max_segments(config))  # from the annotations, before any image
  skip_bad = bool(config.dataset.skip_bad_examples)
  if skip_bad:
    source = SkipBadExamples(source)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) < batch:
    raise ValueError(f"{len(ds)} training examples on process {process_index} is fewer than "
                     f"the per-process batch {batch}")
  ds = ds.seed(_process_seed(config.seed, process_index)).shuffle().repeat()
  ds = apply_transforms(ds, train_transforms(config))
  prefetch = max(int(config.dataset.prefetch), 1)
  if not skip_bad:
    ds = ds.batch(batch, drop_remainder=True)
    # Elements here are whole batches: a few threads/buffer slots, not grain's 16/500 defaults.
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch,
                                                 prefetch_buffer_size=prefetch))
  else:
    # Skipped examples are Nones, which `to_iter_dataset` drops; batching after it keeps every
    # batch full (MapDataset.batch cannot drop them). Elements are single examples here:
    # `prefetch` batches' worth of buffer and threads.
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=min(prefetch * batch, 16),
                                                 prefetch_buffer_size=prefetch * batch))
    it_ds = it_ds.batch(batch, drop_remainder=True)
    # Stop instead of spinning forever when (nearly) everything is bad: grain raises once
    # `MAX_BAD_RATIO` of a window of 1000 reads were skipped (it warns from 0.9 by default).
    it_ds = grain.experimental.WithOptionsIterDataset(it_ds, grain.experimental.DatasetOptions(
        filter_raise_threshold_ratio=MAX_BAD_RATIO))
  num_workers = int(config.dataset.num_workers)
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=prefetch))
  return it_ds


def make_train_iterator(config, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """Iterator over this process's training batches (see `make_train_dataset`).

  Checkpointable: `it.get_state()` / `it.set_state(state)` (or grain.checkpoint in orbax).
  """
  return iter(make_train_dataset(config, process_index, process_count))


def make_eval_dataset(config, split: str | None = None, process_index: int | None = None,
                      process_count: int | None = None) -> tuple[grain.MapDataset, tuple[str, ...]]:
  """(dataset, class_names) for evaluation on `split` (default config.dataset.eval_split).

  The dataset is a grain MapDataset of records (`transforms.MultiScaleResize`): images, a
  tuple of uint8 (h, w, 3) test-resized images, one per ratio in config.eval.scales; image, the
  original uint8 image; label int32 (H, W) at the original resolution; name str.
  `config.eval.max_examples` (>= 0) keeps the first examples of the split; the rest is split
  across processes round-robin (shards may differ in size by one).
  """
  process_index, process_count = _process_layout(process_index, process_count)
  split = config.dataset.eval_split if split is None else split
  source = registry.get_source(config.dataset, split)
  ds = grain.MapDataset.source(source)
  max_examples = int(config.eval.max_examples)
  if max_examples >= 0:
    ds = ds[:max_examples]
  ds = ds[process_index::process_count]
  ops = eval_transforms(config)
  if is_panoptic(config):  # semantic evaluation of panoptic records: their class-id label map
    ops = [SemanticFromPanoptic(ignore_index=int(config.dataset.ignore_index)), *ops]
  return apply_transforms(ds, ops), tuple(source.class_names)


@dataclasses.dataclass(frozen=True)
class SemanticFromPanoptic(grain.transforms.Map):
  """A panoptic record -> dict(image, label = the class id per pixel, ignore_index on void
  (`coco_panoptic.semantic_label`), name), for semantic evaluation of a panoptic dataset."""
  ignore_index: int

  def map(self, record: dict) -> dict:
    return {"image": record["image"], "name": record["name"],
            "label": coco_panoptic.semantic_label(record, self.ignore_index)}


@dataclasses.dataclass(frozen=True)
class PanopticEvalTarget(grain.transforms.Map):
  """A panoptic record (masks (N, H, W), class_ids, is_crowd) and its index in the split ->
  dict(image, name, image_id = the index, segments (H, W) int32 = i + 1 on the pixels of
  segment i and 0 on void, segment_classes (N,) int32, segment_is_crowd (N,) bool): the ground
  truth of `segvit_jax.evaluation.pq` in one map instead of N masks. With `mask_stack` (masks
  that may overlap: instance datasets), `segments` is the (N, H, W) bool stack itself, and the
  record's json areas, if any, come along as `segment_areas` (N,) (COCOeval's area ranges)."""
  mask_stack: bool = False

  def map(self, element: tuple[int, dict]) -> dict:
    index, record = element
    masks = np.asarray(record["masks"], bool)
    n = len(masks)
    out = {"image": record["image"], "name": record["name"], "image_id": int(index),
           "segment_classes": np.asarray(record["class_ids"], np.int32).reshape(n),
           "segment_is_crowd": np.asarray(record.get("is_crowd", np.zeros(n, bool)),
                                          bool).reshape(n)}
    if self.mask_stack:
      out["segments"] = masks
      if "area" in record:
        out["segment_areas"] = np.asarray(record["area"], np.float64).reshape(n)
      return out
    segments = np.zeros(masks.shape[1:], np.int32)
    for i, mask in enumerate(masks):
      segments[mask] = i + 1
    out["segments"] = segments
    return out


def make_panoptic_eval_dataset(config, split: str | None = None,
                               process_index: int | None = None,
                               process_count: int | None = None
                               ) -> tuple[grain.MapDataset, coco_panoptic.Categories]:
  """(dataset, categories) for panoptic / instance evaluation (`config.eval.task`) on `split`.

  The source is read with crowd segments kept (`drop_crowd=False`, whatever training uses):
  PQ and AP ignore predictions on crowd regions. Records (`PanopticEvalTarget`, then
  `transforms.MultiScaleResize` by `config.eval`): images (the test-resized image,
  "long_side"), image (the original uint8), name, image_id (the index in the split: unique
  across processes), segments (H, W) int32 (0 void, i + 1 segment i; for a source whose masks
  overlap, `masks_overlap`, the (N, H, W) bool masks and their `segment_areas`),
  segment_classes, segment_is_crowd. `categories`: class names, thing flags and the dataset's
  (COCO) category ids. Sharded across processes like `make_eval_dataset`."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  process_index, process_count = _process_layout(process_index, process_count)
  split = config.dataset.eval_split if split is None else split
  dataset_cfg = ml_collections.ConfigDict(config.dataset.to_dict())
  dataset_cfg.drop_crowd = False
  source = registry.get_source(dataset_cfg, split)
  categories = getattr(source, "categories", None)
  if not isinstance(categories, coco_panoptic.Categories):
    raise ValueError(f"config.eval.task={config.eval.task!r} needs a panoptic dataset "
                     f"(records with masks, class ids and thing / stuff categories, e.g. "
                     f"{', '.join(sorted(coco_panoptic.PANOPTIC_DATASETS))}); "
                     f"config.dataset.name={config.dataset.name!r} is not one")
  ds = grain.MapDataset.source(source)
  max_examples = int(config.eval.max_examples)
  if max_examples >= 0:
    ds = ds[:max_examples]
  ds = ds.map_with_index(lambda i, r: (i, r))[process_index::process_count]
  target = PanopticEvalTarget(mask_stack=bool(getattr(source, "masks_overlap", False)))
  return apply_transforms(ds, [target, *eval_transforms(config)]), categories
