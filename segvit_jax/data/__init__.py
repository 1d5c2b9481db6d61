"""Data: datasets, mmseg-style augmentations and grain pipelines.

  registry.py   config.dataset.name -> the dataset module that reads it (`get_source`,
                `class_names`)
  files.py      reading (image, label) file pairs, shared by the file-backed datasets
  ade20k.py coco_stuff.py pascal_context.py cityscapes.py coco_panoptic.py coco_instance.py
  ade20k_panoptic.py folder.py tfds.py synthetic.py  one module per dataset
  palettes.py   class colours for every picture
  transforms.py pipeline.py  augmentations and the grain input pipelines
  check.py      `python -m segvit_jax.data.check`: validate a dataset before training
"""
