"""Predicts segmentation maps for images with a model bundle or a training workdir.

  python predict.py --checkpoint runs/demo/bundle --input photo.jpg --output out/
  python predict.py --checkpoint runs/demo --input images/ --output out/ --save_scores
  python predict.py --task panoptic --checkpoint BUNDLE --input coco/val2017 --output out/

Semantic (default), per image NAME: `NAME.png` (class ids, uint8 or uint16), `NAME_overlay.jpg`
(colour overlay) and, with --save_scores, `NAME.npy`: per-class scores (C, H, W) float32 at the
input resolution, the array `Bundle.predict` gives. Every image goes through the one inference
path of eval.py (`segvit_jax.evaluation.inference.MultiScalePredictor`) under the model's test
protocol (--protocol model, the default): --config's `eval` section if given, else the one the
bundle records (a training run's, or a converter's --config), else the whole image; --scales /
--flip override its multi-scale ratios and flip. `--protocol whole` gives the raw whole-image
output, padded only where the model family's reference pads (README, "Evaluation and
prediction"). Images are read as 8-bit RGB whatever their mode (16-bit scaled, palette, CMYK,
EXIF orientation applied); a file that cannot be read or predicted is named and skipped, the
others are written, and the exit status is 1.

Panoptic (`--task panoptic`, mask-classification models: EoMT), in COCO's panoptic format so
that COCO's panopticapi scores the output as it is (`pq_compute(GT_JSON, "out/panoptic.json")`):
`panoptic/NAME.png` (segment id = R + 256 G + 256^2 B, 0 = void), `panoptic.json` ({"annotations":
[{image_id, file_name, segments_info: [{id, category_id, isthing, iscrowd, area, bbox}]}],
"categories": [...]}; image_id = int(NAME) for COCO's numeric file names) and
`NAME_overlay.jpg`. The image goes through EoMT's panoptic protocol (`segvit_jax.evaluation`):
longer side resized to --size, black padding to the square, one model call, the post-processing
of `segvit_jax.evaluation.panoptic` with --object_mask_threshold / --overlap_threshold. Category
ids and thing flags come from the bundle's `categories` entry ([{id, name, isthing}], in class
order) or from --categories (a COCO panoptic json, e.g. annotations/panoptic_val2017.json).

Panoptic defaults (--size, the thresholds) come from the recorded protocol where there is one.
The dash spellings --save-scores, --object-mask-threshold, --overlap-threshold and
--compilation-cache still work.
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from segvit_jax import checkpoint, runtime
from segvit_jax.data import palettes, transforms
from segvit_jax.data.files import read_image
from segvit_jax.evaluation import inference, panoptic, pictures
from segvit_jax.models import patch_size

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A model bundle or a training workdir.")
_INPUT = flags.DEFINE_string("input", None, "An image file or a directory of images.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory.")
_SAVE_SCORES = flags.DEFINE_bool("save_scores", False, "Also write the scores, NAME.npy.")
flags.DEFINE_alias("save-scores", "save_scores")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: latest).")
_TASK = flags.DEFINE_enum("task", "semantic", ["semantic", "panoptic"],
                          "Semantic class maps, or COCO-format panoptic segments.")
_PROTOCOL = flags.DEFINE_enum("protocol", "model", ["model", "whole"],
                              "Semantic: the model's test protocol (--config's, else the "
                              "bundle's, else the whole image) or the raw whole image.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "A config (configs/NAME.py[:ARG]) "
                                          "whose test protocol (config.eval) to run.")
_SCALES = flags.DEFINE_list("scales", None, "Multi-scale test ratios, e.g. 0.5,0.75,1.0,1.25,"
                            "1.5,1.75 (default: the protocol's).")
_FLIP = flags.DEFINE_bool("flip", None, "Also predict the mirrored images (default: the "
                          "protocol's).")
_SIZE = flags.DEFINE_integer("size", None, "Panoptic: the square model input (default: the "
                             "recorded protocol's, else the model's position grid x its "
                             "patch size).")
_CATEGORIES = flags.DEFINE_string("categories", None, "Panoptic: a COCO panoptic json whose "
                                  "categories (in class order) give category ids and thing "
                                  "flags (default: the bundle's).")
_OBJECT_MASK_THRESHOLD = flags.DEFINE_float(
    "object_mask_threshold", None, "Panoptic: queries kept above this class probability "
    "(default: the recorded protocol's, else EoMT's 0.8).")
flags.DEFINE_alias("object-mask-threshold", "object_mask_threshold")
_OVERLAP_THRESHOLD = flags.DEFINE_float(
    "overlap_threshold", None, "Panoptic: segments kept if this share of their mask survives "
    "(default: the recorded protocol's, else EoMT's 0.8).")
flags.DEFINE_alias("overlap-threshold", "overlap_threshold")
runtime.define_compilation_cache_flag()
flags.DEFINE_alias("compilation-cache", "compilation_cache")
flags.mark_flags_as_required(["checkpoint", "input", "output"])


def list_images(path: str) -> list[str]:
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
    return files
  if not os.path.isfile(path):
    raise FileNotFoundError(f"input {path} does not exist")
  return [path]


def test_protocol(model) -> ml_collections.ConfigDict:
  """The `eval` section predict.py runs: --protocol whole's, --config's, the bundle's or the
  whole image's, with --scales / --flip applied (checked before anything compiles)."""
  if _PROTOCOL.value == "whole":
    ev = ml_collections.ConfigDict(inference.WHOLE_EVAL)
  elif _CONFIG.value is not None:
    ev = ml_collections.ConfigDict(_CONFIG.value.eval.to_dict())
  else:
    ev = ml_collections.ConfigDict(model.config.get("eval") or inference.WHOLE_EVAL)
  if _SCALES.value:
    ev.scales = inference.check_ratios(_SCALES.value, "--scales")
  if _FLIP.value is not None:
    ev.flip = _FLIP.value
  inference.check_protocol(ev)
  return ev


def progress(i: int, total: int, t0: float) -> str:
  """'3.2 img/s, ETA 0:41' after i of total images."""
  rate = i / max(time.perf_counter() - t0, 1e-9)
  eta = int((total - i) / rate)
  return f"{rate:.2f} img/s, ETA {eta // 60}:{eta % 60:02d}"


@jax.jit
def _labels(total: jax.Array) -> jax.Array:
  return jnp.argmax(total, axis=-1).astype(jnp.int32)


def main(argv: list[str]) -> int:
  runtime.no_arguments(argv)
  files = list_images(_INPUT.value)
  model = checkpoint.load_model(_CHECKPOINT.value, step=_STEP.value)
  output = _OUTPUT.value
  if _TASK.value == "panoptic":
    return predict_panoptic(model, files, output)
  with model.config.unlocked():
    model.config.eval = test_protocol(model)
  predictor = model.predictor("model")
  num_classes = model.config.model.num_classes
  # The classes' colours, as in training and evaluation pictures (the bundle's class names).
  colours = palettes.palette_for_class_names(model.config.class_names)
  os.makedirs(output, exist_ok=True)
  skipped, done = [], 0
  t0 = time.perf_counter()
  # Images go through the engine a group at a time: windows of the same shape from several
  # images share model calls.
  for first in range(0, len(files), predictor.protocol.window_batch):
    group = []
    for i, file in enumerate(files[first:first + predictor.protocol.window_batch], first):
      try:
        image = read_image(file)
        views = predictor.protocol.test_resize.map({"image": image})["images"]
        for view in views:  # a view too large for one forward pass is this file's problem
          predictor.layout(*view.shape[:2])
      except ValueError as e:
        skipped.append((file, str(e)))
        print(f"[{i + 1}/{len(files)}] skipped {file}: {e}", file=sys.stderr, flush=True)
        continue
      group.append((i, file, image, views))
    totals = predictor.run([(views, image.shape[:2]) for _, _, image, views in group])
    for (i, file, image, _), total in zip(group, totals):
      h, w = image.shape[:2]
      pred = np.asarray(_labels(total))[:h, :w].astype(
          np.uint8 if num_classes <= 256 else np.uint16)
      name = os.path.splitext(os.path.basename(file))[0]
      Image.fromarray(pred).save(os.path.join(output, f"{name}.png"))
      pictures.save(os.path.join(output, f"{name}_overlay.jpg"),
                    pictures.overlay_picture(image, pred, colours, model.config.class_names))
      if _SAVE_SCORES.value:
        np.save(os.path.join(output, f"{name}.npy"), predictor.mean_scores(total, (h, w)))
      done += 1
      print(f"[{i + 1}/{len(files)}] {file} -> {name}.png "
            f"({progress(done + len(skipped), len(files), t0)})", flush=True)
  print(f"wrote {len(files) - len(skipped)} predictions to {output}")
  return report_skipped(skipped, len(files))


def report_skipped(skipped: list[tuple[str, str]], total: int) -> int:
  """Names every skipped file on stderr; exit status 1 if there is one."""
  if not skipped:
    return 0
  print(f"error: {len(skipped)} of {total} images skipped:", file=sys.stderr)
  for file, why in skipped:
    print(f"  {file}: {why}", file=sys.stderr)
  return 1


def load_categories(model, path: str | None) -> list[dict]:
  """[{id, name, isthing}] in class order: from a COCO panoptic json (`path`) or the bundle."""
  if path:
    with open(path, encoding="utf-8") as f:
      categories = json.load(f)["categories"]
  else:
    categories = model.config.get("categories", None)
    if not categories:
      raise app.UsageError("panoptic prediction needs the dataset's categories (COCO ids and thing "
                       "flags): the bundle has none; pass --categories with a COCO panoptic "
                       "json, e.g. annotations/panoptic_val2017.json")
  categories = [{"id": int(c["id"]), "name": str(c["name"]), "isthing": int(c["isthing"])}
                for c in categories]
  if len(categories) != model.config.model.num_classes:
    raise app.UsageError(f"{len(categories)} categories for a model of "
                     f"{model.config.model.num_classes} classes")
  return categories


def predict_panoptic(model, files: list[str], output: str) -> int:
  """`--task panoptic`: COCO panoptic PNGs + json and overlays (module docstring)."""
  cfg = model.config.model
  if cfg.get("name") != "eomt":
    raise app.UsageError(f"--task panoptic needs a mask-classification model (eomt), not "
                     f"{cfg.get('name')!r}")
  categories = load_categories(model, _CATEGORIES.value)
  is_thing = [bool(c["isthing"]) for c in categories]
  coco_ids = [c["id"] for c in categories]
  ev = model.config.get("eval") or {}
  recorded = ev.get("task") == "panoptic"  # the recorded protocol is a panoptic one
  size = _SIZE.value or (int(ev["scale"][0]) if recorded and ev.get("scale") else
                         int(cfg.backbone.posemb_grid[0]) * patch_size(cfg))
  object_mask_threshold, overlap_threshold = (
      flag.value if flag.value is not None else
      float(ev[key]) if recorded else 0.8  # EoMT App. A.3
      for flag, key in ((_OBJECT_MASK_THRESHOLD, "object_mask_threshold"),
                        (_OVERLAP_THRESHOLD, "overlap_threshold")))
  patch = patch_size(cfg)
  if size < patch or size % patch:
    raise app.UsageError(f"--size={size}: expected a positive multiple of the patch size "
                         f"{patch}")
  for name, value in (("object_mask_threshold", object_mask_threshold),
                      ("overlap_threshold", overlap_threshold)):
    if not 0.0 <= value <= 1.0:
      raise app.UsageError(f"--{name}={value}: expected a value from 0 to 1")

  def apply_fn(v, x):
    out = model.model.apply(v, x)
    return out["class_logits"], out["mask_logits"]

  predictor = inference.MaskPredictor(apply_fn, model.variables, (size, size),
                                      mean=model.config.mean, std=model.config.std)
  colours = palettes.palette_for_class_names([c["name"] for c in categories])
  png_dir = os.path.join(output, "panoptic")
  os.makedirs(png_dir, exist_ok=True)
  annotations, skipped = [], []
  t0 = time.perf_counter()
  for i, file in enumerate(files):
    try:
      image = read_image(file)
    except ValueError as e:
      skipped.append((file, str(e)))
      print(f"[{i + 1}/{len(files)}] skipped {file}: {e}", file=sys.stderr, flush=True)
      continue
    h, w = image.shape[:2]
    # EoMT's panoptic protocol: the longer side to the input, one scale (the divisor and the
    # minimum size do not apply to this policy).
    resized = transforms.resize_for_test(image, "long_side", (size, size), ratio=1.0,
                                         size_divisor=1, min_size=0)
    class_logits, mask_logits = predictor.logits([resized])
    masks = predictor.at_size(mask_logits[0], resized.shape[:2], (h, w))
    maps = panoptic.panoptic_maps(class_logits[0], masks, jnp.asarray((h, w), jnp.int32),
                                  object_mask_threshold)
    maps = {k: np.asarray(v) for k, v in maps.items()}
    lookup, segments = panoptic.panoptic_segments(maps, is_thing, overlap_threshold)
    ids = panoptic.segment_map(maps, lookup, (h, w))
    name = os.path.splitext(os.path.basename(file))[0]
    Image.fromarray(panoptic.id_to_rgb(ids)).save(os.path.join(png_dir, f"{name}.png"))
    annotations.append({"image_id": int(name) if name.isdigit() else name,
                        "file_name": f"{name}.png",
                        "segments_info": panoptic.coco_segments_info(ids, segments, coco_ids)})
    classes = [s["class_id"] for s in segments]
    pictures.save(os.path.join(output, f"{name}_overlay.jpg"),
                  pictures.with_legend(panoptic.overlay(image, ids, classes, is_thing, colours),
                                       sorted(set(classes)), [c["name"] for c in categories],
                                       colours)[0])
    print(f"[{i + 1}/{len(files)}] {file} -> panoptic/{name}.png, {len(segments)} segments "
          f"({progress(i + 1, len(files), t0)})", flush=True)
  with open(os.path.join(output, "panoptic.json"), "w", encoding="utf-8") as f:
    json.dump({"annotations": annotations, "categories": categories}, f)
  print(f"wrote {len(annotations)} panoptic predictions to {output}")
  return report_skipped(skipped, len(files))


if __name__ == "__main__":
  sys.exit(runtime.run(main))
