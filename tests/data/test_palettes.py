"""Tests for segvit_jax.data.palettes: one distinct colour per class, the same colours by
dataset name and by class names."""

import numpy as np

from segvit_jax.data import ade20k, cityscapes, coco_stuff, palettes, pascal_context, synthetic


def test_palettes_have_one_distinct_colour_per_class():
  sizes = dict(ade20k=150, coco_stuff10k=171, pascal_context=60, pascal_context59=59,
               cityscapes=19)
  assert set(palettes.PALETTES) == set(sizes)
  for name, palette in palettes.PALETTES.items():
    assert palette.dtype == np.uint8 and palette.shape == (sizes[name], 3), name
    assert len({tuple(c) for c in palette}) == sizes[name], name
    assert not (palette == 0).all(-1).any(), name  # black is left for ignore pixels
    np.testing.assert_array_equal(palettes.palette_for(name, sizes[name]), palette)
  np.testing.assert_array_equal(palettes.PALETTES["cityscapes"][[0, 1, 10, 18]],
                                [[128, 64, 128], [244, 35, 232], [70, 130, 180], [119, 11, 32]])
  np.testing.assert_array_equal(palettes.generated_palette(4),
                                [[0, 255, 0], [0, 0, 255], [255, 0, 0], [0, 255, 255]])
  # Other datasets / class counts: the generated sequence, whose prefixes are stable.
  np.testing.assert_array_equal(palettes.palette_for("synthetic", 6),
                                palettes.PALETTES["ade20k"][:6])
  np.testing.assert_array_equal(palettes.palette_for("ade20k", 151),
                                palettes.PALETTES["coco_stuff10k"][:151])
  p = palettes.palette_for("cityscapes", 19)
  p[0] = 0  # a copy: the table is not changed
  assert palettes.PALETTES["cityscapes"][0].tolist() == [128, 64, 128]


def test_palette_for_class_names_knows_a_dataset_by_its_names():
  # A bundle records class names, not the dataset: its pictures get the dataset's colours.
  known = {"ade20k": ade20k.ADE20K_CLASSES, "coco_stuff10k": coco_stuff.COCO_STUFF_CLASSES,
           "pascal_context": pascal_context.PASCAL_CONTEXT_CLASSES,
           "pascal_context59": pascal_context.PASCAL_CONTEXT59_CLASSES,
           "cityscapes": cityscapes.CITYSCAPES_CLASSES}
  assert set(known) == set(palettes.PALETTES)
  for name, class_names in known.items():
    got = palettes.palette_for_class_names(list(class_names))
    np.testing.assert_array_equal(got, palettes.PALETTES[name])
    np.testing.assert_array_equal(got, palettes.palette_for(name, len(class_names)))
    assert got.dtype == np.uint8 and got.flags.writeable  # a copy, the table stays frozen
  np.testing.assert_array_equal(palettes.palette_for_class_names(cityscapes.CITYSCAPES_CLASSES)[:2],
                                [[128, 64, 128], [244, 35, 232]])


def test_palette_for_class_names_of_unknown_names_is_the_generated_one():
  for names in (synthetic.CLASS_NAMES, ("sky", "road", "car"),
                ("other",) + ade20k.ADE20K_CLASSES,  # ade20k without reduce_zero_label
                tuple(reversed(cityscapes.CITYSCAPES_CLASSES)),  # same names, other order
                cityscapes.CITYSCAPES_CLASSES[:18]):
    np.testing.assert_array_equal(palettes.palette_for_class_names(names),
                                  palettes.generated_palette(len(names)))
  # As eval's pictures of these datasets (by dataset name) get them.
  np.testing.assert_array_equal(palettes.palette_for_class_names(synthetic.CLASS_NAMES),
                                palettes.palette_for("synthetic", 6))
  np.testing.assert_array_equal(
      palettes.palette_for_class_names(("other",) + ade20k.ADE20K_CLASSES),
      palettes.palette_for("ade20k", 151))
  assert palettes.palette_for_class_names([]).shape == (0, 3)
