"""The key-rule tables (segvit_jax/convert/rules.py): the template parser and formatter, the rule
checks, the messages for unknown, unmapped and incomplete keys, and the round trip of every
two-way table of the converters (segvit_official, segformer, eomt, timm, hf) on random tensors
with the shapes of a small model of ours, bitwise."""

from __future__ import annotations

import numpy as np
import pytest

from segvit_jax.convert import augreg, backbone, dinov2, eomt, hf, rules, segformer, \
    segvit_official, timm, whole_model
from segvit_jax.convert.rules import KeyRule


# ----------------------------------------------------------------------------------------------
# Templates

def test_integer_fields_and_offsets():
  t = "decoder_{s+1}.layers.{j}.norm1"
  assert rules.parse_key(t, "decoder_3.layers.10.norm1") == {"s": 2, "j": 10}
  assert rules.format_key(t, {"s": 2, "j": 10, "unused": 7}) == "decoder_3.layers.10.norm1"
  assert rules.parse_key("block.{s-1}.{j}", "block.0.4") == {"s": 1, "j": 4}
  assert rules.format_key("block.{s-1}.{j}", {"s": 1, "j": 4}) == "block.0.4"
  assert rules.parse_key("encoderblock_{i}/norm1", "encoderblock_12/norm1") == {"i": 12}


def test_choice_fields():
  t = "Transformer/encoderblock_{i}/LayerNorm_{n:1|2}/{p:scale|bias}"
  assert rules.parse_key(t, "Transformer/encoderblock_0/LayerNorm_2/bias") == {
      "i": 0, "n": "2", "p": "bias"}
  assert rules.parse_key(t, "Transformer/encoderblock_0/LayerNorm_3/bias") is None
  assert rules.format_key(t, {"i": 5, "n": "1", "p": "scale"}) == (
      "Transformer/encoderblock_5/LayerNorm_1/scale")
  with pytest.raises(ValueError, match=r"'kernel' is not one of \('scale', 'bias'\)"):
    rules.format_key(t, {"i": 0, "n": "1", "p": "kernel"})


def test_no_match():
  assert rules.parse_key("blocks.{i}.norm1.weight", "blocks.x.norm1.weight") is None
  assert rules.parse_key("blocks.{i}.norm1.weight", "blocks.0.norm1.weight.extra") is None
  assert rules.parse_key("blocks.{i}.norm1.weight", "xblocks.0.norm1.weight") is None
  # Literal text is literal: a dot is not any character.
  assert rules.parse_key("norm.weight", "normXweight") is None
  assert rules.parse_key("blocks.{i}.", "blocks.0.3.") is None
  assert rules.parse_key("blocks.{chunk}.{i}.", "blocks.0.3.") == {"chunk": 0, "i": 3}


def test_malformed_templates_fail():
  with pytest.raises(ValueError, match="names the field 'i' twice"):
    rules.parse_key("a.{i}.b.{i}", "a.1.b.1")
  with pytest.raises(ValueError, match="malformed field"):
    rules.parse_key("a.{i", "a.1")


def test_rule_fields_are_checked():
  with pytest.raises(ValueError, match=r"field\(s\) \['j'\] are not fields of the same kind"):
    KeyRule("blocks.{i}.weight", "encoderblock_{j}/kernel")
  with pytest.raises(ValueError, match="not fields of the same kind"):
    KeyRule("norm{n:1|2}.weight", "norm{n}/scale")  # a choice on their side, an integer on ours
  with pytest.raises(ValueError, match="have other fields"):
    KeyRule("qkv.{i}", ("q_{i}", "k"))
  assert KeyRule("blocks.{i}.x", "b_{i}/x").invertible
  assert not KeyRule("blocks.{chunk}.{i}.x", "b_{i}/x").invertible  # the chunk is forgotten
  assert not KeyRule("x", "y", rules.merge_heads_in, None).invertible


# ----------------------------------------------------------------------------------------------
# Messages

LINEAR = rules.linear("blocks.{i}.fc", "encoderblock_{i}/fc")


def test_unknown_keys_are_named():
  tensors = {"blocks.0.fc.weight": np.zeros((3, 2)), "blocks.0.fc.bias": np.zeros(3),
             "head.weight": np.zeros(1), **{f"extra.{k}": np.zeros(1) for k in range(25)}}
  with pytest.raises(ValueError) as e:
    rules.to_ours(tensors, LINEAR, source="f.pth", layout="test", dropped=[r"head\..*"])
  assert str(e.value) == (
      "f.pth: 25 tensor(s) the test layout of this model does not have: "
      + ", ".join(f"extra.{k}" for k in range(20)) + " ... and 5 more")
  with pytest.raises(ValueError, match=r"^f\.pth is not a timm ViT checkpoint: 1 tensor\(s\) "
                                       r"this layout does not have: x$"):
    rules.to_ours({"x": np.zeros(1)}, LINEAR, source="f.pth", layout="timm", model="ViT")
  twice = LINEAR + (KeyRule("blocks.{i}.other.bias", "encoderblock_{i}/fc/bias"),)
  with pytest.raises(ValueError, match=r"f: two tensors map to 'encoderblock_0/fc/bias' "
                                       r"\(second: 'blocks\.0\.other\.bias'\)"):
    rules.to_ours({"blocks.0.fc.bias": np.zeros(3), "blocks.0.other.bias": np.zeros(3)}, twice,
                  source="f", layout="test")


def test_unmapped_and_incomplete_parameters_are_named():
  table = rules.packed_linear("blocks.{i}.qkv", ["b_{i}/q", "b_{i}/k", "b_{i}/v"])
  params = {"b_0/q/kernel": np.zeros((2, 2)), "b_0/k/kernel": np.zeros((2, 2)),
            "b_0/v/kernel": np.zeros((2, 2)), "b_1/q/bias": np.zeros(2),
            "b_1/k/bias": np.zeros(2), "stray/scale": np.zeros(2)}
  with pytest.raises(ValueError) as e:
    rules.to_theirs(params, table, source="bundle", layout="test")
  assert str(e.value) == ("bundle: parameters the test layout cannot hold:\n"
                          "  unmapped (1): stray/scale\n"
                          "  incomplete packed groups (1): b_1/q/bias (needs b_1/v/bias)")


def test_one_way_tables_refuse_to_write():
  for table in (dinov2.RULES, augreg.RULES):
    with pytest.raises(ValueError, match=r"table only reads: \d+ rule\(s\) have no inverse"):
      rules.to_theirs({}, table, source="b", layout="x")


# ----------------------------------------------------------------------------------------------
# Transforms

def test_transforms_invert_each_other():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((6, 4, 3, 2)).astype(np.float32)
  assert np.array_equal(rules.to_torch_conv(rules.from_torch_conv(w)), w)
  assert np.array_equal(rules.to_torch_conv_transpose(rules.from_torch_conv_transpose(w)), w)
  packed = rng.standard_normal((6, 4)).astype(np.float32)
  q, k, v = rules.unpack(packed, 3)
  assert q.shape == (4, 2) and np.array_equal(q, packed[:2].T)
  assert np.array_equal(rules.pack(q, k, v), packed)
  bias = rng.standard_normal(6).astype(np.float32)
  assert np.array_equal(rules.pack(*rules.unpack(bias, 2)), bias)


# ----------------------------------------------------------------------------------------------
# Every two-way table, both ways, on the shapes of a small model of ours

def _random(shapes: dict, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s.shape).astype(np.float32) for k, s in shapes.items()}


def _round_trip(flat: dict[str, np.ndarray], table, layout: str) -> dict[str, np.ndarray]:
  theirs = rules.to_theirs(flat, table, source="ours", layout=layout)
  used = {r.theirs for r in table
          if any(rules.parse_key(r.theirs, k) is not None for k in theirs)}
  assert used == {r.theirs for r in table}, ("rules that map nothing", layout,
                                             {r.theirs for r in table} - used)
  back = rules.to_ours(theirs, table, source="theirs", layout=layout)
  assert set(back) == set(flat)
  for k, v in flat.items():
    assert np.array_equal(back[k], v), (layout, k)
  return theirs


SEGVIT = {
    "atm": dict(name="segvit", num_classes=6, backbone=dict(
        width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=8, posemb_grid=(8, 8),
        cls_in_blocks=False), head=dict(tap_layers=(1, 2, 3), width=32, num_heads=4,
                                        layers_per_stage=2)),
    "shrunk": dict(name="segvit", num_classes=6, backbone=dict(
        width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=8, posemb_grid=(8, 8),
        cls_in_blocks=False, shrink_idx=2), head=dict(
            type="shrunk", tap_layers=(1, 3), width=32, num_heads=4, query_grid=(8, 8),
            qu_layers=2, atm_layers=2)),
}


@pytest.mark.parametrize("kind", sorted(SEGVIT))
def test_segvit_official_tables_round_trip(kind):
  shapes = rules.flatten(whole_model.abstract_variables(SEGVIT[kind])["params"])
  theirs = _round_trip(_random(shapes, 0), segvit_official.RULES[kind], "segvit-official")
  assert "backbone.layers.3.attn.attn.in_proj_weight" in theirs


SEGFORMER = dict(name="segformer", num_classes=5, backbone=dict(variant="B0"),
                 head=dict(width=32))


@pytest.mark.parametrize("fmt", segformer.FORMATS)
def test_segformer_tables_round_trip(fmt):
  shapes = rules.flatten(whole_model.abstract_variables(SEGFORMER))
  assert any(k.startswith("batch_stats/") for k in shapes)
  _round_trip(_random(shapes, 1), segformer.RULES[fmt], fmt)
  encoder = {k[len("params/backbone/"):]: v for k, v in _random(shapes, 2).items()
             if k.startswith("params/backbone/")}
  _round_trip(encoder, segformer.ENCODER_RULES[fmt], fmt)


def _eomt(ffn: str) -> dict:
  return dict(name="eomt", num_classes=6, num_queries=10, num_blocks=2, backbone=dict(
      width=64, depth=3, num_heads=4, mlp_dim=176 if ffn == "swiglu" else 256, ffn=ffn,
      patch_size=16, posemb_grid=(4, 4), num_registers=4, layerscale=1.0))


@pytest.mark.parametrize("ffn", ("mlp", "swiglu"))
@pytest.mark.parametrize("fmt", eomt.FORMATS)
def test_eomt_tables_round_trip(fmt, ffn):
  flat = {"params/" + k: v for k, v in _random(rules.flatten(
      whole_model.abstract_variables(_eomt(ffn))["params"]), 3).items()}
  # Both layouts give the cls token no position: exports fold our cls slot away first.
  flat["params/backbone/pos_embedding"][:, :1] = 0
  table = eomt.official_rules(ffn) if fmt == eomt.OFFICIAL else eomt.hf_rules(ffn)
  _round_trip(flat, table, fmt)


VITS = {
    "vit": dict(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=8, posemb_grid=(4, 4)),
    "dinov2_reg": dict(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=8,
                       posemb_grid=(4, 4), layerscale=1e-5, num_registers=4),
    "dinov2_swiglu": dict(width=64, depth=2, mlp_dim=96, num_heads=4, patch_size=8,
                          posemb_grid=(4, 4), layerscale=1e-5, ffn="swiglu"),
}


@pytest.mark.parametrize("vit", sorted(VITS))
def test_backbone_tables_round_trip(vit):
  """The timm and transformers backbone tables are two-way too (only read today); the rules a
  model of this kind does not use (registers, LayerScale, the other FFN) are left out."""
  cfg = VITS[vit]
  flat = _random({k: np.zeros(s) for k, s in backbone.backbone_shapes(cfg).items()}, 4)
  used = lambda table: tuple(r for r in table if any(  # noqa: E731
      rules.parse_key(r.our_paths[0], k) is not None for k in flat))
  ffn = cfg.get("ffn", "mlp")
  _round_trip(flat, used(timm.RULES[ffn]), "timm")
  _round_trip(flat, used(hf.VIT_RULES if vit == "vit" else hf.DINOV2_RULES), "hf")
  # timm's packed SwiGLU is told apart by its shapes.
  assert timm.ffn_of(rules.to_theirs(flat, used(timm.RULES[ffn]), source="o", layout="timm"),
                     "blocks.0.mlp.") == ffn
