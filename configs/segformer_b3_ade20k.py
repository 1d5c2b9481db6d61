"""SegFormer-B3 on ADE20K at 512x512 (spec segformer.md, "Results to reproduce").

  python train.py --config configs/segformer_b3_ade20k.py --workdir runs/segformer_b3_ade20k \
      --config.dataset.root=/data/ADEChallengeData2016

Starts from the ImageNet MiT-B3 encoder of the release, weights/mit_b3.pth (README,
"Pretrained weights"). Recipe: AdamW lr 6e-5 (decoder x10), weight decay 0.01, poly power 1
with 1500 warm-up iterations, global batch 16, 160k iterations, per-pixel cross-entropy;
test: whole image, keep-ratio (2048, 512) rounded up to 32.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  return common.segformer_config("B3", "ade20k")
