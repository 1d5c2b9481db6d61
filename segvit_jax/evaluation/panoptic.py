"""Panoptic and instance post-processing of mask-classification outputs (spec eomt.md,
"Inference"), with the semantics of EoMT's `to_per_pixel_preds_panoptic` and instance
`eval_step` (themselves Mask2Former's `panoptic_inference` / `instance_inference`), and COCO's
panoptic file format.

Inputs per image: class logits (K, C + 1) (the last class is "no object") and mask logits at the
original image size (`inference.MaskPredictor.at_size`: (Hb, Wb, K), channels last, in a buffer
whose [:H, :W] is the image). Thresholds come from `config.eval` (`PostProcessing`).

Panoptic (`panoptic_maps` on the device, `panoptic_segments` on the host):
  1. per query: score, class = max, argmax of softmax(class logits) over the C classes AND
     no-object; the query is kept if its class is not no-object and score >
     `object_mask_threshold` (0.8).
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
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TASKS = ("semantic", "panoptic", "instance")


@dataclasses.dataclass(frozen=True)
class PostProcessing:
  """The post-processing half of `config.eval` for mask classification: `task` ("panoptic":
  PQ and, with `instance_ap`, thing mask AP from the same predictions; "instance": mask AP),
  `object_mask_threshold`, `overlap_threshold` (panoptic), `top_k` (instance). The defaults are
  EoMT's / Mask2Former's COCO values."""
  task: str = "panoptic"
  object_mask_threshold: float = 0.8
  overlap_threshold: float = 0.8
  top_k: int = 100
  instance_ap: bool = True

  def __post_init__(self):
    if self.task not in ("panoptic", "instance"):
      raise ValueError(f"config.eval.task={self.task!r}: mask post-processing is 'panoptic' "
                       "or 'instance'")
    if self.top_k < 1:
      raise ValueError(f"config.eval.top_k={self.top_k} must be positive")

  @classmethod
  def from_config(cls, config) -> "PostProcessing":
    ev, d = config.eval, cls()
    return cls(task=ev.get("task", "semantic"),
               object_mask_threshold=float(ev.get("object_mask_threshold",
                                                  d.object_mask_threshold)),
               overlap_threshold=float(ev.get("overlap_threshold", d.overlap_threshold)),
               top_k=int(ev.get("top_k", d.top_k)),
               instance_ap=bool(ev.get("instance_ap", d.instance_ap)))

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
                       is_thing_class: Sequence[bool], object_mask_threshold: float = 0.8,
                       overlap_threshold: float = 0.8) -> tuple[np.ndarray, list[dict]]:
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
                       top_k: int = 100) -> dict[str, np.ndarray]:
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
