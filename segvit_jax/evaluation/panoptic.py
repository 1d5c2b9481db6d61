"""Panoptic and instance evaluation of mask-classification models (EoMT): the post-processing
of their outputs and the evaluation loop (`evaluate`; both here: the file stays small).

Post-processing (EoMT App. A.3; Mask2Former Sec. 4.1 "Post-processing."), with the semantics
of EoMT's `to_per_pixel_preds_panoptic` and instance `eval_step` (themselves Mask2Former's
`panoptic_inference` / `instance_inference`), and COCO's panoptic file format.

Inputs per image: class logits (K, C + 1) (the last class is "no object") and mask logits at the
original image size (`inference.MaskPredictor.at_size`: (Hb, Wb, K), channels last, in a buffer
whose [:H, :W] is the image). Thresholds come from `config.eval` (`PostProcessing`).

Panoptic (`panoptic_maps` on the device, `panoptic_segments` on the host):
  1. per query: score, class = max, argmax of softmax(class logits) over the C classes AND
     no-object; the query is kept if its class is not no-object and score >
     `object_mask_threshold` (0.8 in the EoMT configs).
  2. every pixel goes to the kept query with the largest score x sigmoid(mask logit) (the first
     one on ties, as torch's argmax).
  3. query q's segment is the pixels it won where its own sigmoid >= 0.5. It survives if the
     pixels it won, its own mask (sigmoid >= 0.5) and the segment are all non-empty and
     won area / own-mask area >= `overlap_threshold` (0.8). (EoMT and Mask2Former compare the
     WON area, not the segment's, with the own-mask area; so do we.)
  4. surviving queries become segments 1, 2, ... in query order, except that the stuff queries
     of one class merge into the segment of the first one; things stay apart. Pixels in no
     segment are void (0).
Instance (`instance_predictions`): the `top_k` (100) largest softmax probabilities over all
(query, class) pairs without no-object; each gives a detection of that class with the query's
mask logit > 0 as its mask and score = class probability x the mean sigmoid inside the mask
(sum(sigmoid * mask) / (sum(mask) + 1e-6)). A panoptic model's instance AP counts thing
classes only (Mask2Former's `panoptic_on` rule: top-k first, then the stuff detections dropped).

COCO's panoptic format (`id_to_rgb`, `coco_segments_info`): a PNG whose pixel RGB encodes the
segment id as R + 256 G + 256^2 B (0 = void) and per image a `segments_info` list of {id,
category_id (the dataset's sparse COCO id), isthing, iscrowd, area, bbox}.

The loop (`evaluate`, `config.eval.task` "panoptic" or "instance"; `segvit_jax.evaluation.
evaluate` dispatches here) runs EoMT's protocol: the longer side resized to the input (`resize`
"long_side", `scale` the input size), padded to the square input, one model call per image
(`inference.MaskPredictor`, `window_batch` images per call), the post-processing above
(`object_mask_threshold`, `overlap_threshold`, `top_k`), PQ / SQ / RQ (All, Things, Stuff, per
class; summed across processes) and, for "instance" or with `instance_ap`, COCO mask AP over
the thing classes (gathered to process 0) (`pq`). Reading ahead, progress and the late fetch
of device results are `loop.run`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segvit_jax.data import palettes, pipeline
from segvit_jax.evaluation import inference, loop, pictures, pq


@dataclasses.dataclass(frozen=True)
class PostProcessing:
  """The post-processing half of `config.eval` for mask classification: `task` ("panoptic":
  PQ and, with `instance_ap`, thing mask AP from the same predictions; "instance": mask AP),
  `object_mask_threshold`, `overlap_threshold` (panoptic), `top_k` (instance)."""
  task: str
  object_mask_threshold: float
  overlap_threshold: float
  top_k: int
  instance_ap: bool

  def __post_init__(self):
    if self.task not in ("panoptic", "instance"):
      raise ValueError(f"config.eval.task={self.task!r}: mask post-processing is 'panoptic' "
                       "or 'instance'")
    if self.top_k < 1:
      raise ValueError(f"config.eval.top_k={self.top_k} must be positive")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "PostProcessing":
    ev = config.eval
    return cls(task=ev.task, object_mask_threshold=float(ev.object_mask_threshold),
               overlap_threshold=float(ev.overlap_threshold), top_k=int(ev.top_k),
               instance_ap=bool(ev.instance_ap))

  @property
  def computes_ap(self) -> bool:
    return self.task == "instance" or self.instance_ap


def _inside(shape: tuple[int, int], size: jax.Array) -> jax.Array:
  """(Hb, Wb) bool: the top-left `size` (H, W) region of a buffer."""
  rows, cols = jnp.arange(shape[0]), jnp.arange(shape[1])
  return (rows[:, None] < size[0]) & (cols[None, :] < size[1])


# ----------------------------------------------------------------------------------------------
# Panoptic.


@jax.jit
def panoptic_maps(class_logits: jax.Array, mask_logits: jax.Array, size: jax.Array,
                  object_mask_threshold: float | jax.Array) -> dict[str, jax.Array]:
  """Steps 1-3 of the panoptic post-processing (module docstring) of one image, fixed shapes.

  class_logits (K, C + 1); mask_logits (Hb, Wb, K) at the original size, `size` (H, W) the
  image's region of the buffer. Returns
    query_map     (Hb, Wb) int32: the kept query that won the pixel if the pixel is in that
                  query's own mask (sigmoid >= 0.5), else -1 (also outside the image)
    labels        (K,) int32 argmax class (C = no object), scores (K,) float32 its probability
    keep          (K,) bool: not no-object and score > object_mask_threshold
    mask_area     (K,) int32 pixels with sigmoid >= 0.5 (kept queries; 0 for the others)
    won_area      (K,) int32 pixels won in the argmax
    segment_area  (K,) int32 pixels won and in the own mask
  (the survival test and the segment ids are `panoptic_segments`' on the host)."""
  k = class_logits.shape[0]
  probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
  scores, labels = probs.max(axis=-1), probs.argmax(axis=-1).astype(jnp.int32)
  keep = (labels != class_logits.shape[-1] - 1) & (scores > object_mask_threshold)
  masks = jax.nn.sigmoid(mask_logits.astype(jnp.float32))  # (Hb, Wb, K)
  inside = _inside(mask_logits.shape[:2], size)
  won = jnp.argmax(jnp.where(keep, scores * masks, -jnp.inf), axis=-1).astype(jnp.int32)
  own = jnp.take_along_axis(masks, won[..., None], axis=-1)[..., 0] >= 0.5
  valid = inside & keep.any()

  def count(where):  # (K,) pixels per winning query among `where`
    return jnp.bincount(jnp.where(where, won, k).ravel(), length=k + 1)[:k]

  return {
      "query_map": jnp.where(valid & own, won, -1),
      "labels": labels, "scores": scores, "keep": keep,
      "mask_area": jnp.where(keep, ((masks >= 0.5) & inside[..., None]).sum((0, 1)), 0
                             ).astype(jnp.int32),
      "won_area": count(valid).astype(jnp.int32),
      "segment_area": count(valid & own).astype(jnp.int32),
  }


def panoptic_segments(maps: dict[str, Any], is_thing_class: Sequence[bool],
                      overlap_threshold: float) -> tuple[np.ndarray, list[dict]]:
  """Step 4 on the host: (lookup (K + 1,) int32 with lookup[q + 1] the segment id of query q
  (0: none; lookup[0] = 0 for void pixels), segments [{id, class_id, isthing, score, query}]
  in id order, `query` the first query of the segment) from `panoptic_maps`' outputs (numpy).
  The survival test runs in Python floats, as EoMT's `new_area / orig_area < overlap_thresh`."""
  labels, scores, keep = (np.asarray(maps[key]) for key in ("labels", "scores", "keep"))
  mask_area, won_area, segment_area = (np.asarray(maps[key]).astype(np.int64)
                                       for key in ("mask_area", "won_area", "segment_area"))
  lookup = np.zeros(len(labels) + 1, np.int32)
  segments, stuff_ids = [], {}
  for q in np.flatnonzero(keep):
    orig, new, final = int(mask_area[q]), int(won_area[q]), int(segment_area[q])
    if orig == 0 or new == 0 or final == 0 or new / orig < overlap_threshold:
      continue
    c = int(labels[q])
    thing = bool(is_thing_class[c])
    if not thing and c in stuff_ids:
      lookup[q + 1] = stuff_ids[c]
      continue
    seg_id = len(segments) + 1
    if not thing:
      stuff_ids[c] = seg_id
    lookup[q + 1] = seg_id
    segments.append({"id": seg_id, "class_id": c, "isthing": thing, "score": float(scores[q]),
                     "query": int(q)})
  return lookup, segments


def segment_map(maps: dict[str, Any], lookup: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """(H, W) int32 segment ids (0 = void) of the image from `query_map` and `lookup`."""
  h, w = size
  return lookup[np.asarray(maps["query_map"])[:h, :w] + 1]


def panoptic_inference(class_logits: np.ndarray, mask_logits: np.ndarray,
                       is_thing_class: Sequence[bool], object_mask_threshold: float,
                       overlap_threshold: float) -> tuple[np.ndarray, list[dict]]:
  """The whole panoptic post-processing of one image: class_logits (K, C + 1), mask_logits
  (K, H, W) at the image size -> (segment ids (H, W) int32, 0 = void; segments as
  `panoptic_segments`)."""
  mask_logits = np.asarray(mask_logits, np.float32)
  size = np.asarray(mask_logits.shape[1:], np.int32)
  maps = jax.device_get(panoptic_maps(jnp.asarray(class_logits),
                                      jnp.asarray(np.moveaxis(mask_logits, 0, -1)), size,
                                      object_mask_threshold))
  lookup, segments = panoptic_segments(maps, is_thing_class, overlap_threshold)
  return segment_map(maps, lookup, size), segments


# ----------------------------------------------------------------------------------------------
# Instance.


@functools.partial(jax.jit, static_argnames=("top_k",))
def instance_predictions(class_logits: jax.Array, mask_logits: jax.Array, size: jax.Array, *,
                         top_k: int) -> dict[str, jax.Array]:
  """EoMT's / Mask2Former's instance post-processing of one image (module docstring):
  class_logits (K, C + 1), mask_logits (Hb, Wb, K) at the original size, `size` (H, W) ->
    masks (Hb, Wb, T) bool (False outside the image), labels (T,) int32, scores (T,) float32,
    queries (T,) int32, T = min(top_k, K * C), ordered by class probability."""
  k, c = class_logits.shape[0], class_logits.shape[1] - 1
  probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, :c]
  top, index = jax.lax.top_k(probs.reshape(-1), min(int(top_k), k * c))
  queries = (index // c).astype(jnp.int32)
  logits = jnp.take(mask_logits.astype(jnp.float32), queries, axis=-1)  # (Hb, Wb, T)
  masks = (logits > 0) & _inside(mask_logits.shape[:2], size)[..., None]
  inside_prob = (jax.nn.sigmoid(logits) * masks).sum((0, 1))
  mask_scores = inside_prob / (masks.sum((0, 1)).astype(jnp.float32) + 1e-6)
  return {"masks": masks, "labels": (index % c).astype(jnp.int32), "scores": top * mask_scores,
          "queries": queries}


def instance_inference(class_logits: np.ndarray, mask_logits: np.ndarray,
                       top_k: int) -> dict[str, np.ndarray]:
  """`instance_predictions` of one image at its own size: class_logits (K, C + 1), mask_logits
  (K, H, W) -> numpy masks (T, H, W) bool, labels (T,), scores (T,), queries (T,)."""
  mask_logits = np.asarray(mask_logits, np.float32)
  out = jax.device_get(instance_predictions(
      jnp.asarray(class_logits), jnp.asarray(np.moveaxis(mask_logits, 0, -1)),
      np.asarray(mask_logits.shape[1:], np.int32), top_k=top_k))
  out["masks"] = np.moveaxis(out["masks"], -1, 0)
  return out


# ----------------------------------------------------------------------------------------------
# COCO panoptic format and pictures.


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
  """Segment ids (H, W) -> (H, W, 3) uint8 with id = R + 256 G + 256^2 B (COCO panoptic PNG)."""
  ids = np.asarray(ids, np.int64)
  return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def coco_segments_info(segments: np.ndarray, segment_list: Sequence[dict],
                       coco_ids: Sequence[int]) -> list[dict]:
  """COCO `segments_info` of a segment map: {id, category_id = coco_ids[class_id], isthing,
  iscrowd 0, area, bbox [x, y, w, h]} per segment of `segment_list` (`panoptic_segments`)."""
  out = []
  for s in segment_list:
    ys, xs = np.nonzero(segments == s["id"])
    bbox = ([int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
             int(ys.max() - ys.min() + 1)] if len(ys) else [0, 0, 0, 0])
    out.append({"id": int(s["id"]), "category_id": int(coco_ids[s["class_id"]]),
                "isthing": int(s["isthing"]), "iscrowd": 0, "area": int(len(ys)), "bbox": bbox})
  return out


def colorize(segments: np.ndarray, segment_classes: Sequence[int],
             is_thing_class: Sequence[bool], colours: np.ndarray) -> np.ndarray:
  """(H, W) segment ids (0 void, i + 1 = segment i of class segment_classes[i]) -> (H, W, 3)
  uint8: stuff in its class colour, each thing in its class colour shifted by an amount drawn
  from its id (instances of one class stay apart), void black, segment borders white."""
  table = np.zeros((len(segment_classes) + 1, 3), np.int32)
  for i, c in enumerate(segment_classes):
    colour = np.asarray(colours[int(c)], np.int32)
    if is_thing_class[int(c)]:
      colour = colour + np.random.default_rng(i + 1).integers(-60, 61, 3)
    table[i + 1] = np.clip(colour, 0, 255)
  out = table[segments].astype(np.uint8)
  border = np.zeros(segments.shape, bool)
  border[1:] |= segments[1:] != segments[:-1]
  border[:, 1:] |= segments[:, 1:] != segments[:, :-1]
  out[border] = 255
  return out


def overlay(image: np.ndarray, segments: np.ndarray, segment_classes: Sequence[int],
            is_thing_class: Sequence[bool], colours: np.ndarray, alpha: float = 0.5
            ) -> np.ndarray:
  """`colorize` blended over the uint8 image (void pixels keep the image)."""
  colour = colorize(segments, segment_classes, is_thing_class, colours).astype(np.float32)
  a = np.where(segments[..., None] > 0, alpha, 0.0)
  out = (1 - a) * image.astype(np.float32) + a * colour
  return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# The evaluation loop.


def mask_protocol_record(config: ml_collections.ConfigDict, split: str) -> dict[str, Any]:
  """What eval_results.json says about how panoptic / instance numbers were obtained."""
  ev, post = config.eval, PostProcessing.from_config(config)
  record = {
      "dataset": config.dataset.name, "split": split, "task": post.task,
      "resize": ev.resize, "scale": list(ev.scale),
      "pad": "bottom/right to the scale, black", "scales": [1.0], "flip": False,
      "object_mask_threshold": post.object_mask_threshold,
      "overlap_threshold": post.overlap_threshold, "top_k": post.top_k,
  }
  if post.task == "panoptic":
    record["pq"] = ("COCO panopticapi: same-class IoU > 0.5 matches, predicted pixels on void "
                    "left out of the union, crowd never matched nor missed, unmatched "
                    "predictions more than half on void or same-class crowd ignored")
  if post.computes_ap:
    record["ap"] = ("pycocotools COCOeval segm, at most top_k detections per image, thing "
                    "classes, crowd ground truth as iscrowd")
  return record


def make_mask_predictor(model, variables: Any, config: ml_collections.ConfigDict
                        ) -> inference.MaskPredictor:
  """The model's class and mask logits under `config.eval`'s panoptic / instance protocol, on
  this process's devices (the input is `config.eval.scale`)."""
  ev = config.eval
  if len(tuple(ev.scale)) != 2:
    raise ValueError(f"config.eval.scale={tuple(ev.scale)}: the panoptic / instance protocol "
                     "needs the (h, w) model input, e.g. (640, 640)")
  if tuple(float(r) for r in ev.scales) != (1.0,) or ev.flip:
    raise ValueError("the panoptic / instance protocol is single-scale without flip: set "
                     "config.eval.scales=(1.0,) and config.eval.flip=False")

  def apply_fn(v, x):
    out = model.apply(v, x)
    return out["class_logits"], out["mask_logits"]

  return inference.MaskPredictor(apply_fn, variables, tuple(ev.scale), mean=config.mean,
                                 std=config.std, batch=int(ev.window_batch),
                                 bucket=int(ev.bucket))


def evaluate(model, variables: Any, config: ml_collections.ConfigDict, *, split: str,
             out_dir: str | None = None, num_pictures: int = 0, progress: bool = False,
             evaluated: dict[str, Any] | None = None) -> dict[str, Any]:
  """Panoptic (PQ, SQ, RQ; with `instance_ap` also mask AP) or instance (mask AP) evaluation
  of a mask-classification model's `variables` on `split` under `config.eval` (module
  docstring). Every process takes a shard; all must call this. Writes `eval_results.json`,
  and with `num_pictures` the first [image | ground truth | prediction] pictures, to `out_dir`
  if given."""
  post = PostProcessing.from_config(config)
  if post.task == "panoptic" and config.dataset.name == "coco_instance":
    raise ValueError("config.eval.task='panoptic' needs panoptic ground truth (segments that do "
                     "not overlap); dataset 'coco_instance' has instances: set "
                     "config.eval.task='instance'")
  dataset, categories = pipeline.make_panoptic_eval_dataset(config, split)
  names, k = categories.names, config.model.num_classes
  if len(names) != k:
    raise ValueError(f"dataset has {len(names)} classes, model.num_classes={k}")
  is_thing = np.asarray(categories.is_thing, bool)
  # AP counts thing classes (a panoptic model's instance AP, Mask2Former's panoptic_on rule).
  ap_classes = is_thing if is_thing.any() else None
  predictor = make_mask_predictor(model, variables, config)
  pic_dir = loop.picture_dir(out_dir, num_pictures)
  colours = palettes.palette_for_class_names(names)
  stats = pq.PQStats.zeros(k)
  instances = pq.InstanceAccumulator()

  def step(records: list[dict]):
    images = [ex["images"][0] for ex in records]
    class_logits, mask_logits = predictor.logits(images)
    for j, ex in enumerate(records):
      size = ex["segments"].shape[-2:]  # a segment map (H, W) or a mask stack (N, H, W)
      masks = predictor.at_size(mask_logits[j], images[j].shape[:2], size)
      with predictor.activate():
        size = jnp.asarray(size, jnp.int32)
        outputs = {}
        if post.task == "panoptic":
          outputs["panoptic"] = panoptic_maps(class_logits[j], masks, size,
                                              post.object_mask_threshold)
        if post.computes_ap:
          outputs["instance"] = instance_predictions(class_logits[j], masks, size,
                                                     top_k=post.top_k)
      yield outputs

  def consume(index: int, ex: dict, outputs: dict) -> None:
    outputs = jax.device_get(outputs)
    gt = ex["segments"]
    if post.task == "panoptic":
      maps = outputs["panoptic"]
      lookup, segments = panoptic_segments(maps, is_thing, post.overlap_threshold)
      pred = segment_map(maps, lookup, gt.shape)
      pred_classes = [s["class_id"] for s in segments]
      stats.add(pq.pq_stats(pred, pred_classes, gt, ex["segment_classes"],
                            ex["segment_is_crowd"], k))
      if pic_dir and index < num_pictures and jax.process_index() == 0:
        image, gt_classes = ex["image"], ex["segment_classes"]
        pictures.save(os.path.join(pic_dir, f"{ex['name']}.jpg"), pictures.titled_panels(
            [image, colorize(gt, gt_classes, is_thing, colours),
             colorize(pred, pred_classes, is_thing, colours),
             overlay(image, pred, pred_classes, is_thing, colours)], pictures.PANEL_TITLES,
            sorted({int(c) for c in [*gt_classes, *pred_classes]}), names, colours))
    if post.computes_ap:
      inst = outputs["instance"]
      h, w = gt.shape[-2:]
      masks = np.moveaxis(inst["masks"][:h, :w], -1, 0)
      instances.add_image(ex["image_id"], gt, ex["segment_classes"], ex["segment_is_crowd"],
                          masks, inst["labels"], inst["scores"], ap_classes,
                          gt_areas=ex.get("segment_areas"))

  speed = loop.run(dataset, step, consume, num_threads=int(config.eval.num_threads),
                   progress=progress, batch=predictor.batch)

  results: dict[str, Any] = {}
  per_class = [{"name": n, "isthing": bool(t)} for n, t in zip(names, is_thing)]
  if post.task == "panoptic":
    pq_numbers = pq.pq_results(stats.allreduce(), names, is_thing)
    for row, pq_row in zip(per_class, pq_numbers.pop("per_class")):
      row.update(pq_row)
    results.update(pq_numbers)
  if post.computes_ap:
    ap = pq.ap_allprocesses(instances, names, ap_classes)
    by_name = {r["name"]: r["AP"] for r in ap.pop("per_class")}
    for row in per_class:
      if row["name"] in by_name:
        row["AP"] = by_name[row["name"]]
    results.update(ap)
  results["per_class"] = per_class
  results["protocol"] = mask_protocol_record(config, split)
  results.update(speed)
  if evaluated:
    results["evaluated"] = evaluated
  loop.write_results(results, out_dir)
  return results
