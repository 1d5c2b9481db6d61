"""grain input pipelines for training and evaluation (spec segvit.md, "Train augmentation").

Train: `MapDataset.source -> shard by JAX process -> seed -> shuffle -> repeat -> augment ->
batch -> to_iter_dataset [-> mp_prefetch]`. Every random number comes from grain's per-element
generators, so a (config, process) pair always yields the same batches, and the iterator's
`get_state()` / `set_state()` resume at the exact batch.

Eval: a `MapDataset` of per-example records (keep-ratio resized, normalised image; label at the
original resolution), sharded by JAX process.
"""

from __future__ import annotations

import grain
import numpy as np

from segvit_jax.data import sources
from segvit_jax.data import transforms as T


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
  # (spec environment.md, grain).
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def train_transforms(config) -> list:
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
    ops.append(T.PhotoMetricDistortion())
  ops += [
      T.Normalize(mean=tuple(config.mean), std=tuple(config.std)),
      T.Pad(size=crop, pad_value=0.0, label_pad_value=config.dataset.ignore_index),
      T.Format(keys=("image", "label")),
  ]
  return ops


def eval_transforms(config) -> list:
  """Test-time resize + normalise, keeping `name` and the full-resolution label."""
  return [
      T.EvalResize(scale=tuple(config.eval.scale)),
      T.Normalize(mean=tuple(config.mean), std=tuple(config.std)),
      T.Format(keys=("image", "label", "name")),
  ]


def apply_transforms(ds: grain.MapDataset, ops) -> grain.MapDataset:
  for op in ops:
    ds = ds.random_map(op) if isinstance(op, grain.transforms.RandomMap) else ds.map(op)
  return ds


def per_process_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(f"config.batch_size {batch_size} is not divisible by the number of JAX "
                     f"processes {process_count}")
  return batch_size // process_count


def make_train_dataset(config, process_index: int | None = None,
                       process_count: int | None = None) -> grain.IterDataset:
  """The infinite training `IterDataset` of this process's batches.

  Batches: image float32 (B, crop_h, crop_w, 3) normalised, label int32 (B, crop_h, crop_w) with
  ignore_index in padding; B = config.batch_size // process_count.
  """
  process_index, process_count = _process_layout(process_index, process_count)
  batch = per_process_batch_size(config.batch_size, process_count)
  source = sources.get_source(config.dataset, config.dataset.train_split)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) < batch:
    raise ValueError(f"{len(ds)} training examples on process {process_index} is fewer than "
                     f"the per-process batch {batch}")
  ds = ds.seed(_process_seed(config.seed, process_index)).shuffle().repeat()
  ds = apply_transforms(ds, train_transforms(config))
  ds = ds.batch(batch, drop_remainder=True)
  prefetch = max(int(config.dataset.get("prefetch", 2)), 1)
  # Elements here are whole batches: a few threads/buffer slots, not grain's 16/500 defaults.
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch,
                                               prefetch_buffer_size=prefetch))
  num_workers = int(config.dataset.get("num_workers", 0))
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

  The dataset is a grain MapDataset of records: image float32 (h, w, 3) normalised after the
  keep-ratio resize to config.eval.scale, label int32 (H, W) at the original resolution, name
  str. `config.eval.max_examples` (>= 0) keeps the first examples of the split; the rest is
  split across processes round-robin (shards may differ in size by one).
  """
  process_index, process_count = _process_layout(process_index, process_count)
  split = config.dataset.eval_split if split is None else split
  source = sources.get_source(config.dataset, split)
  ds = grain.MapDataset.source(source)
  max_examples = int(config.eval.get("max_examples", -1))
  if max_examples >= 0:
    ds = ds[:max_examples]
  ds = ds[process_index::process_count]
  return apply_transforms(ds, eval_transforms(config)), tuple(source.class_names)
