"""The converter's command line (`python -m segvit_jax.convert`): every format of the formats
table is reachable through --from (and --to where it exports), the old dash spellings are
aliases of the underscore flags, --help lists the converter's own flags, and a user's mistake
is one line on stderr with exit status 1."""

from __future__ import annotations

import dataclasses

import pytest
from absl import flags

from segvit_jax import convert
from segvit_jax.convert import __main__ as cli

from tests import support


def _fake(what: str, name: str):
  def run(*args, **kwargs):
    del args, kwargs
    raise ValueError(f"reached {what} of {name}")
  return run


@pytest.mark.parametrize("name", list(convert.FORMAT_TABLE))
def test_every_format_is_reachable(name, monkeypatch, tmp_path, capsys):
  """--from NAME reaches the format's import function, --to NAME its export (formats without
  one are refused by the flag), through the table."""
  fmt = convert.FORMAT_TABLE[name]
  monkeypatch.setitem(convert.FORMAT_TABLE, name, dataclasses.replace(
      fmt, read=_fake("read", name), export=fmt.export and _fake("export", name)))
  src = tmp_path / "src"
  src.write_bytes(b"")
  config = ["--config", "x.py"] if fmt.config == "required" else []
  capsys.readouterr()
  assert cli.cli([str(src), str(tmp_path / "out"), "--from", name, *config]) == 1
  assert capsys.readouterr().err == f"error: ValueError: reached read of {name}\n"
  assert cli.cli([str(src), str(tmp_path / "out"), "--to", name]) == 1
  err = capsys.readouterr().err
  if fmt.export is None:
    assert err.startswith(f"error: flag --to={name}: value should be one of <")
  else:
    assert err == f"error: ValueError: reached export of {name}\n"


def test_formats_derive_from_the_table():
  table = convert.FORMAT_TABLE
  assert convert.FORMATS == ("augreg-npz", "timm", "dinov2", "hf-vit", "hf-dinov2", "dinov3",
                             "hf-dinov3")
  assert convert.MODEL_FORMATS == ("segvit-official", "segformer-official", "hf-segformer",
                                   "eomt-official", "hf-eomt", "hf-eomt-dinov3", "torch")
  assert convert.EXPORT_FORMATS == convert.MODEL_FORMATS
  assert convert.CONFIG_REQUIRED == ("segvit-official",)
  assert convert.MIT_FORMATS == ("segformer-official", "hf-segformer")
  assert set(convert.FORMATS + convert.MODEL_FORMATS) == set(table)


def test_dash_spellings_are_aliases():
  values = {}
  for spelling in ("-", "_"):
    fv = flags.FlagValues()
    names = cli.define_flags(fv)
    rest = fv(["prog", "SRC", "--from", "timm", f"--image{spelling}size", "64x32", "OUT",
               f"--patch{spelling}size", "16", f"--posemb{spelling}resize", "bilinear",
               f"--patch{spelling}resize", "bicubic", f"--num{spelling}heads", "3",
               f"--trust{spelling}pickle", "--mean", "1,2,3", "--std=4,5,6"])
    assert rest == ["prog", "SRC", "OUT"]
    values[spelling] = {n: fv[n].value for n in names}
  assert values["-"] == values["_"] == {
      "from": "timm", "to": None, "config": None, "image_size": (64, 32), "patch_size": 16,
      "posemb_resize": "bilinear", "patch_resize": "bicubic", "num_heads": 3,
      "mean": (1.0, 2.0, 3.0), "std": (4.0, 5.0, 6.0), "trust_pickle": True,
      "backbone": None, "delta_from": None, "overwrite": False}


@pytest.mark.parametrize("arg", ["--help", "-h"])
def test_help_lists_the_converters_flags(arg, capsys):
  assert cli.cli([arg]) == 0
  out = capsys.readouterr().out
  lines = out.splitlines()
  fv = flags.FlagValues()
  for name in cli.define_flags(fv):
    line = [x for x in lines if x.startswith((f"  --{name} ", f"  --{name}:",
                                               f"  --[no]{name}"))]
    assert len(line) == 1, (name, line)
    assert fv[name].help in line[0]
  for alias, name in cli.ALIASES.items():
    assert any(x.startswith((f"  --{name} (alias --{alias}): ",
                             f"  --[no]{name} (alias --{alias}): ")) for x in lines), (name, out)
  for name, fmt in convert.FORMAT_TABLE.items():
    assert f"  {name:<19} {fmt.kind}: {fmt.help}" in out
  assert "grain" not in out and "jax_" not in out and "orbax" not in out


def test_help_runs_as_a_module():
  proc = support.run("-m", "segvit_jax.convert", "--help")
  assert proc.returncode == 0 and "  --image_size (alias --image-size): " in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["a", "b", "--from", "timm", "--image-siz", "64"], "Unknown command line flag 'image-siz'"),
    (["a", "b", "--from", "nope"], "flag --from=nope: value should be one of <augreg-npz|"),
    (["a", "b", "--from", "timm", "--image-size", "6x"], "'6x' is not H or HxW"),
    (["a", "b", "--from", "timm", "--mean", "x"], "flag --mean=x: could not convert"),
    (["a", "--from", "timm"], "expected SRC and OUT, got 1 argument(s): a; usage: "),
    (["a", "b", "--from", "segvit-official", "--config", "c.py", "--image_size", "64",
      "--patch-size", "8"], "--image_size, --patch-size apply to backbone formats only"),
])
def test_mistakes_are_one_line(args, message, capsys):
  capsys.readouterr()
  assert cli.cli(args) == 1
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err.startswith("error: ")
  assert captured.err.count("\n") == 1 and message in captured.err, captured.err
