"""Predicts segmentation maps for images with a model bundle or a training workdir.

  python predict.py --checkpoint runs/demo/bundle --input photo.jpg --output out/
  python predict.py --checkpoint runs/demo --input images/ --output out/ --save_scores
  python predict.py --task panoptic --checkpoint BUNDLE --input coco/val2017 --output out/

Semantic (default), per image NAME: `NAME.png` (class ids, uint8 or uint16), `NAME_overlay.jpg`
(colour overlay) and, with --save_scores, `NAME.npy`: per-class scores (C, H, W) float32 at the
input resolution. The whole image is processed at its own resolution with the model's own
normalisation.

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

The dash spellings --save-scores, --object-mask-threshold, --overlap-threshold and
--compilation-cache still work.
"""

import json
import os
import sys
import time

import jax.numpy as jnp
import numpy as np
from absl import app, flags
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
_SIZE = flags.DEFINE_integer("size", None, "Panoptic: the square model input (default: the "
                             "model's position grid x its patch size).")
_CATEGORIES = flags.DEFINE_string("categories", None, "Panoptic: a COCO panoptic json whose "
                                  "categories (in class order) give category ids and thing "
                                  "flags (default: the bundle's).")
_OBJECT_MASK_THRESHOLD = flags.DEFINE_float(
    "object_mask_threshold", 0.8, "Panoptic: queries kept above this class probability.")
flags.DEFINE_alias("object-mask-threshold", "object_mask_threshold")
_OVERLAP_THRESHOLD = flags.DEFINE_float(
    "overlap_threshold", 0.8, "Panoptic: segments kept if this share of their mask survives.")
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


def main(argv: list[str]) -> int:
  runtime.no_arguments(argv)
  files = list_images(_INPUT.value)
  model = checkpoint.load_model(_CHECKPOINT.value, step=_STEP.value)
  output = _OUTPUT.value
  if _TASK.value == "panoptic":
    return predict_panoptic(model, files, output)
  num_classes = model.config.model.num_classes
  # The classes' colours, as in training and evaluation pictures (the bundle's class names).
  colours = palettes.palette_for_class_names(model.config.class_names)
  os.makedirs(output, exist_ok=True)
  t0 = time.perf_counter()
  for i, file in enumerate(files):
    image = read_image(file)
    scores = model.predict(image[None])[0]  # (C, H, W)
    pred = scores.argmax(0).astype(np.uint8 if num_classes <= 256 else np.uint16)
    name = os.path.splitext(os.path.basename(file))[0]
    Image.fromarray(pred).save(os.path.join(output, f"{name}.png"))
    pictures.save(os.path.join(output, f"{name}_overlay.jpg"),
                  pictures.overlay(image, pred, colours))
    if _SAVE_SCORES.value:
      np.save(os.path.join(output, f"{name}.npy"), scores.astype(np.float32))
    rate = (i + 1) / (time.perf_counter() - t0)
    print(f"[{i + 1}/{len(files)}] {file} -> {name}.png ({rate:.2f} img/s)", flush=True)
  print(f"wrote {len(files)} predictions to {output}")
  return 0


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
  size = _SIZE.value or int(cfg.backbone.posemb_grid[0]) * patch_size(cfg)

  def apply_fn(v, x):
    out = model.model.apply(v, x)
    return out["class_logits"], out["mask_logits"]

  predictor = inference.MaskPredictor(apply_fn, model.variables, (size, size),
                                      mean=model.config.mean, std=model.config.std)
  colours = palettes.palette_for_class_names([c["name"] for c in categories])
  png_dir = os.path.join(output, "panoptic")
  os.makedirs(png_dir, exist_ok=True)
  annotations = []
  t0 = time.perf_counter()
  for i, file in enumerate(files):
    image = read_image(file)
    h, w = image.shape[:2]
    # EoMT's panoptic protocol: the longer side to the input, one scale (the divisor and the
    # minimum size do not apply to this policy).
    resized = transforms.resize_for_test(image, "long_side", (size, size), ratio=1.0,
                                         size_divisor=1, min_size=0)
    class_logits, mask_logits = predictor.logits([resized])
    masks = predictor.at_size(mask_logits[0], resized.shape[:2], (h, w))
    maps = panoptic.panoptic_maps(class_logits[0], masks, jnp.asarray((h, w), jnp.int32),
                                  _OBJECT_MASK_THRESHOLD.value)
    maps = {k: np.asarray(v) for k, v in maps.items()}
    lookup, segments = panoptic.panoptic_segments(maps, is_thing, _OVERLAP_THRESHOLD.value)
    ids = panoptic.segment_map(maps, lookup, (h, w))
    name = os.path.splitext(os.path.basename(file))[0]
    Image.fromarray(panoptic.id_to_rgb(ids)).save(os.path.join(png_dir, f"{name}.png"))
    annotations.append({"image_id": int(name) if name.isdigit() else name,
                        "file_name": f"{name}.png",
                        "segments_info": panoptic.coco_segments_info(ids, segments, coco_ids)})
    classes = [s["class_id"] for s in segments]
    pictures.save(os.path.join(output, f"{name}_overlay.jpg"),
                  panoptic.overlay(image, ids, classes, is_thing, colours))
    rate = (i + 1) / (time.perf_counter() - t0)
    print(f"[{i + 1}/{len(files)}] {file} -> panoptic/{name}.png, {len(segments)} segments "
          f"({rate:.2f} img/s)", flush=True)
  with open(os.path.join(output, "panoptic.json"), "w", encoding="utf-8") as f:
    json.dump({"annotations": annotations, "categories": categories}, f)
  print(f"wrote {len(files)} panoptic predictions to {output}")
  return 0


if __name__ == "__main__":
  sys.exit(runtime.run(main))
