"""The skeleton every config fills in, and the two helpers the configs share.

A config file (`configs/X.py`, `get_config(arg)`) states its own recipe: dataset, train
augmentation, model, pretrained weights, loss, optimiser, iterations and batch, and the test
protocol, each number with the paper table / section (or the release's config) it comes from.
This file holds no recipe: `run_config` is the skeleton, the one place a config key gets its
default (library code reads the keys instead of defaulting them again); `model_config` a
config's model section with the keys every model has (`MODEL_DEFAULTS`); `vit_memory_knobs`
the memory / compilation switches of a ViT backbone section; `smoke` shrinks any config to its
`configs/X.py:smoke` variant, a few seconds on a CPU on a fabricated copy of its dataset.

Config names that later work relies on: `total_steps`, `batch_size` (global),
`grad_accum_steps`, `seed`, `log_every`, `ckpt_every`, `eval_every`, `dataset.name`,
`dataset.root`, `mesh.{data,fsdp,tensor}`, `model_init`.
"""

import ml_collections

from segvit_jax.models import vit


def run_config() -> ml_collections.ConfigDict:
  """The skeleton every training/evaluation config fills in: every key and its one default."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 160_000
  c.batch_size = 16  # global, across all devices and hosts
  # Micro-batches per step: the global batch is split into this many parts that run one after
  # the other inside the step (gradients summed, one optimizer update), so a batch needs about
  # 1 / grad_accum_steps of the activation memory. batch_size must divide by
  # grad_accum_steps x the batch shards (mesh data x fsdp).
  c.grad_accum_steps = 1
  c.log_every = 50
  c.ckpt_every = 4000
  c.keep_ckpts = 3
  c.eval_every = 16_000  # 0 disables evaluation during training
  # Pretrained weights: "" (from scratch), a bundle (whole model or backbone), or a foreign
  # backbone checkpoint in `model_init_format` (segvit_jax.convert.FORMATS), converted and
  # resized to the model on load.
  c.model_init = ""
  c.model_init_format = "bundle"

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: all remaining

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "synthetic"
  c.dataset.root = ""
  c.dataset.num_classes = 6
  c.dataset.ignore_index = 255
  c.dataset.reduce_zero_label = False
  c.dataset.train_split = "train"
  c.dataset.eval_split = "val"
  c.dataset.num_workers = 0  # grain worker processes for training data (0: in-process)
  c.dataset.prefetch = 2
  # A training example that fails to read (undecodable image, label size mismatch, label out of
  # range): False stops the run with the error naming the file; True skips it with a warning
  # naming the file and goes on (segvit_jax.data.pipeline.SkipBadExamples). Find them all first
  # with `python -m segvit_jax.data.check --config ...`.
  c.dataset.skip_bad_examples = False
  # Panoptic datasets only: segments per training image in the batch (thing instances and stuff
  # regions, crowd dropped); training checks the json against it before it starts. 0: unset.
  c.dataset.max_segments = 0
  # Panoptic datasets only: segment-index layers of a training label. 1: one (H, W) map (panoptic
  # segments do not overlap); L > 1: (H, W, L), each segment in the first layer where it
  # overlaps none (overlapping instances, COCO instances; transforms.segment_map).
  c.dataset.mask_layers = 1
  # Panoptic datasets only: crowd segments (`iscrowd` 1) are left out of the training targets,
  # as Mask2Former / EoMT train (evaluation always keeps them, to ignore predictions on them).
  c.dataset.drop_crowd = True
  # Only used by the synthetic set.
  c.dataset.image_size = 128
  c.dataset.num_train = 2000
  c.dataset.num_eval = 100
  c.dataset.seed = 0  # which scenes it draws

  # Train augmentation. "segvit": mmseg's keep-ratio resize by a random ratio, random crop with
  # cat_max_ratio, flip, photometric distortion, pad; "eomt": EoMT's colour jitter, flip, scale
  # jitter, pad, random crop (segvit_jax.data.pipeline).
  c.augment = ml_collections.ConfigDict()
  c.augment.pipeline = "segvit"
  c.augment.crop_size = (512, 512)  # both pipelines
  c.augment.flip_prob = 0.5  # both pipelines
  # "segvit" only.
  c.augment.scale = (2048, 512)  # keep-ratio base scale (long, short)
  c.augment.ratio_range = (0.5, 2.0)
  c.augment.cat_max_ratio = 0.75
  # mmseg's PhotoMetricDistortion: brightness + U(-+delta) (of 255), contrast and saturation
  # x U(range), hue + U(-+delta) (of 180), each with p 0.5.
  c.augment.photometric = True
  c.augment.photometric_brightness = 32
  c.augment.photometric_contrast = (0.5, 1.5)
  c.augment.photometric_saturation = (0.5, 1.5)
  c.augment.photometric_hue = 18
  # "eomt" only. Scale jitter: the image is resized keeping its ratio by a factor uniform in
  # this range times crop / long side.
  c.augment.scale_jitter = (0.5, 2.0)
  # Colour jitter (torchvision functional ops, as EoMT's `Transforms`): brightness x U(1 -+ b),
  # contrast and saturation x U(1 -+ c / s), hue shift U(-+h) turns; each with p 0.5.
  c.augment.color_jitter = True
  c.augment.jitter_brightness = 32 / 255
  c.augment.jitter_contrast = 0.5
  c.augment.jitter_saturation = 0.5
  c.augment.jitter_hue = 18 / 360

  # Pixel normalisation (0-255 scale).
  c.mean = (127.5, 127.5, 127.5)
  c.std = (127.5, 127.5, 127.5)

  c.model = model_config({})

  # Loss (segvit_jax.losses.LOSSES by name); the options are the named loss's keyword
  # arguments. "atm": SegViT's ATM loss.
  c.loss = ml_collections.ConfigDict(dict(
      name="atm",
      ce_weight=1.0,
      no_object_weight=0.1,
      focal_weight=20.0,
      focal_alpha=0.25,
      focal_gamma=2.0,
      dice_weight=1.0,
      ignore_in_masks=False,  # True excludes ignore pixels from focal/dice (reference: False)
      # The mask classification losses ("mask2former*") only: BCE and dice divided by every
      # ground-truth mask of the batch, "valid_targets" (transformers' Mask2FormerLoss), or by
      # the matched ones, "matched_targets" (the EoMT release); the other losses drop it.
      mask_normalizer="valid_targets",
  ))

  # AdamW (segvit_jax.optim).
  c.optim = ml_collections.ConfigDict(dict(
      lr=2e-5,
      lr_mults={"head": 10.0},  # per top-level module: every decoder parameter x10
      weight_decay=0.01,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      no_decay=(r"^backbone/.*norm",),  # regexes on '/'-joined parameter paths
      clip_norm=35.0,  # 0: none
      # "warmup_poly": linear warm-up over warmup_steps from warmup_ratio x lr, then poly;
      # "two_stage": the new parameters warm up over warmup_steps with the backbone at 0, then
      # the backbone over backbone_warmup_steps; then both poly.
      schedule="warmup_poly",
      warmup_steps=1500,
      warmup_ratio=1e-6,
      backbone_warmup_steps=0,
      poly_power=1.0,
      min_lr=0.0,
      # Layer-wise lr decay of the ViT backbone's blocks; None: off.
      layer_decay=ml_collections.config_dict.placeholder(float),
      # The last N backbone blocks keep the full lr under layer_decay (0: all decay).
      layer_decay_skip_last=0,
  ))

  c.eval = ml_collections.ConfigDict()
  # Test protocol (segvit_jax.evaluation; eval.py --scales / --flip set scales / flip).
  # Test resize: "keep_ratio" to scale (long, short) (mmseg: SegViT), "keep_ratio_aligned" (the
  # same, sides rounded up to size_divisor: SegFormer ADE20K), "short_side" (shorter side to
  # scale = the crop: EoMT), "long_side" (longer side to scale = the model input: EoMT panoptic
  # / instance), "none"; an empty scale keeps the image as it is.
  c.eval.resize = "keep_ratio"
  c.eval.scale = (2048, 512)
  c.eval.size_divisor = 32
  # mmseg 0.x Resize(min_size=...) with keep_ratio: the short side becomes max(short * ratio,
  # min_size), the long side uncapped (SegViT's COCO-Stuff / PASCAL-Context test); 0: off.
  c.eval.min_size = 0
  c.eval.scales = (1.0,)  # multi-scale ratios, e.g. (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  c.eval.flip = False  # also predict the mirrored image
  # Windows: "slide" (mmseg grid, crop_size / stride), "spread" (EoMT: ceil(side / crop)
  # evenly spread windows), "whole" (the image, padded to the patch size).
  c.eval.mode = "slide"
  c.eval.crop_size = (512, 512)
  c.eval.stride = (341, 341)
  # Views (scales x flips) combine as "softmax" probabilities (mmseg) or raw "scores" (mask
  # classification: EoMT, Mask2Former).
  c.eval.average = "softmax"
  # Also report metrics without class 0 (mIoU59 of a 60-class PASCAL-Context model); None:
  # automatic (pascal_context with 60 classes).
  c.eval.background_free_metrics = None
  c.eval.window_batch = 8  # windows per model call
  c.eval.bucket = 64  # image buffers are padded to multiples of this (fewer compilations)
  c.eval.num_threads = 4  # reading / resizing threads ahead of the device
  c.eval.max_examples = -1  # -1: the whole split
  # What to evaluate (segvit_jax.evaluation): "semantic" (mIoU), or for mask-classification
  # models (EoMT) "panoptic" (PQ / SQ / RQ, plus COCO mask AP of the things with instance_ap)
  # or "instance" (mask AP). Those test with resize "long_side", one image per window
  # (window_batch images per model call), and the post-processing of
  # segvit_jax.evaluation.panoptic: queries kept above object_mask_threshold, segments kept if
  # >= overlap_threshold of their own mask survives, top_k (query, class) detections per image
  # for AP.
  c.eval.task = "semantic"
  c.eval.object_mask_threshold = 0.8
  c.eval.overlap_threshold = 0.8
  c.eval.top_k = 100
  c.eval.instance_ap = True
  # Evaluations during training keep the parameters of the best one as a bundle in WORKDIR/best/
  # (its record in WORKDIR/best.json): the evaluation result compared, higher is better;
  # "" keeps none.
  c.eval.best_metric = "mIoU"
  # Each evaluation during training writes its results and pictures of its first images (and,
  # semantic, the confusion matrix) to WORKDIR/eval/step_N/ and to TensorBoard's Images tab.
  c.eval.num_pictures = 4
  return c


# Keys of every model section, with their one default (a config's own value wins):
#   attention  how every attention of the model is computed (segvit_jax.models.layers
#              ATTENTION_IMPLEMENTATIONS): "auto" (cuDNN's fused flash attention on an NVIDIA
#              GPU in bfloat16 / float16 where the head size and mask allow it, else XLA; on a
#              CPU exactly XLA), "xla", "cudnn" or "explicit" (the softmax written out). No
#              effect on the parameters: free to change on resume.
MODEL_DEFAULTS = dict(attention="auto")


def model_config(fields: dict) -> ml_collections.ConfigDict:
  """A config's `config.model`: MODEL_DEFAULTS with the config's `fields` over them."""
  return ml_collections.ConfigDict({**MODEL_DEFAULTS, **fields})


def vit_memory_knobs(scan_layers: bool = False) -> dict:
  """The memory / compilation switches of a ViT backbone section, off unless given (no effect
  on the numbers): `remat` recomputes block activations in the backward pass (less memory, ~1/3 more
  compute), keeping what `remat_policy` names (nothing_saveable, dots_saveable,
  dots_with_no_batch_dims_saveable or everything_saveable: jax.checkpoint_policies);
  `scan_layers` runs the blocks as one nn.scan (one compiled block: faster compiles of deep
  models; block params stacked on a leading depth axis; checkpoints of either layout resume
  either way, bundles always store the unstacked layout). The 24-block SegViT ViT-L configs
  scan: their train step compiles in about a third of the time (BENCHMARKS.md, "Compile
  time")."""
  return dict(remat=False, remat_policy="nothing_saveable", scan_layers=scan_layers)


# ------------------------------------------------------------------------------------------
# The smoke variant.

SMOKE_CROP = 64  # a multiple of 32: SegViT-Shrunk's and MiT's input divisor
SMOKE_DEPTH = 4  # ViT blocks


def smoke_block(index: int, depth: int) -> int:
  """A ViT block index of a `depth`-block recipe at the same relative depth of a
  SMOKE_DEPTH-block model (block 5 of 12 -> 1 of 4; the last block stays the last)."""
  return max(round((index + 1) * SMOKE_DEPTH / depth) - 1, 0)


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`c` (in place) as its seconds-long CPU variant: the same model family and structure
  (ATM taps and stages, SegViT-Shrunk's QD block and QU taps at the same relative depths,
  EoMT's query blocks and annealing, MiT's four stages), dataset name, augmentation pipeline,
  loss and test protocol, with the model tiny (SMOKE_DEPTH blocks of width 32 and 2 heads;
  heads of width 16), every length of the recipe scaled by SMOKE_CROP / crop, batch 2, two
  steps (logged, checkpointed and evaluated), float32 and no pretrained weights. Point it at a
  fabricated copy of the dataset with --config.dataset.root."""
  s = SMOKE_CROP
  recipe_crop = int(c.augment.crop_size[0])
  scaled = lambda size: tuple(int(v) * s // recipe_crop for v in size)  # noqa: E731
  c.update(total_steps=2, batch_size=2, grad_accum_steps=1, log_every=1, ckpt_every=2,
           eval_every=2, model_init="")
  c.dataset.num_workers = 0
  c.augment.crop_size = (s, s)
  if c.augment.pipeline == "segvit":
    c.augment.scale = scaled(c.augment.scale)
  c.eval.update(crop_size=(s, s), stride=scaled(c.eval.stride), scale=scaled(c.eval.scale),
                min_size=int(c.eval.min_size) * s // recipe_crop)

  m = c.model
  m.dtype = "float32"
  bb, head = m.backbone, m.get("head")
  if m.name == "segformer" or bb.get("type") == "mit":
    bb.update(dims=(16, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
  else:
    depth, patch = vit.decode_variant(bb.variant)["depth"], vit.patch_size(bb)
    bb.update(depth=SMOKE_DEPTH, width=32, num_heads=2, mlp_dim=64,
              posemb_grid=(s // patch, s // patch))
    if bb.get("shrink_idx") is not None:
      bb.shrink_idx = smoke_block(bb.shrink_idx - 1, depth) + 1
    if head is not None:
      head.tap_layers = tuple(smoke_block(i, depth) for i in head.tap_layers)
  if m.name == "segformer":
    head.width = 16
  elif m.name == "segvit" and head.get("type") == "shrunk":
    head.update(width=16, num_heads=2, qu_layers=1, atm_layers=1,
                query_grid=tuple(bb.posemb_grid))
  elif m.name == "segvit":
    head.update(width=16, num_heads=2, layers_per_stage=1)
  elif m.name == "eomt":
    l2 = min(int(m.num_blocks), SMOKE_DEPTH // 2)
    part = max(c.total_steps // (l2 + 2), 1)  # consecutive windows, the run in L2 + 2 parts
    if c.optim.layer_decay_skip_last == m.num_blocks:  # no layer decay on the query blocks
      c.optim.layer_decay_skip_last = l2
    m.update(num_blocks=l2, num_queries=8)
    m.mask_annealing.update(start_steps=tuple(part * (i + 1) for i in range(l2)),
                            end_steps=tuple(part * (i + 2) for i in range(l2)))
    c.loss.update(num_queries=8, num_points=256)
  return c

