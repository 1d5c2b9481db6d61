"""The package's import graph: no module of `segvit_jax` takes part in an import cycle, no module
reaches into another's private (`_name`) helpers, and every module imports on its own.

Edges come from every import statement of a module (function-level ones included, so a cycle
cannot hide in a deferred import): `from segvit_jax.a import b` is an edge to the module
`segvit_jax.a.b` when that is a module, else to `segvit_jax.a` (the package whose names it
takes); `import segvit_jax.a.b` is an edge to `segvit_jax.a.b`.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from tests.support import ROOT

PACKAGE = "segvit_jax"


def module_files() -> dict[str, str]:
  """Module name -> file path, for every module of the package."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, PACKAGE)):
    dirnames[:] = [d for d in dirnames if d != "__pycache__"]
    for name in filenames:
      if not name.endswith(".py"):
        continue
      rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3].split(os.sep)
      if rel[-1] == "__init__":
        rel = rel[:-1]
      out[".".join(rel)] = os.path.join(dirpath, name)
  return out


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
  if not node.level:
    return node.module or ""
  base = module.split(".")
  base = base if is_package else base[:-1]
  base = base[:len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: str, modules: dict[str, str]) -> list[tuple[str, str, int]]:
  """(imported module, imported name or "", line) of every segvit_jax import in a module."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  is_package = path.endswith("__init__.py")
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(a.name, "", node.lineno) for a in node.names
              if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")]
    elif isinstance(node, ast.ImportFrom):
      base = _absolute(module, is_package, node)
      if base != PACKAGE and not base.startswith(PACKAGE + "."):
        continue
      for a in node.names:
        sub = f"{base}.{a.name}"
        out.append((sub, "", node.lineno) if sub in modules else (base, a.name, node.lineno))
  return out


def import_graph() -> dict[str, set[str]]:
  modules = module_files()
  return {m: {target for target, _, _ in imports(m, p, modules) if target != m}
          for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan), each sorted."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in graph:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_cycle_finder_finds_a_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
  assert cycles(graph) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
  found = cycles(import_graph())
  assert not found, "import cycles in segvit_jax:\n" + "\n".join(" <-> ".join(c) for c in found)


def _private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


def test_no_module_uses_another_modules_private_names():
  modules = module_files()
  offences = []
  for module, path in sorted(modules.items()):
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    # Names bound to other segvit_jax modules in this file: `import segvit_jax.a as x`,
    # `from segvit_jax import a`, `from segvit_jax.a import b as x` (b a module).
    aliases = {}
    for target, name, line in imports(module, path, modules):
      if name and _private(name):
        offences.append(f"{module}:{line} imports {target}.{name}")
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom):
        base = _absolute(module, path.endswith("__init__.py"), node)
        for a in node.names:
          if f"{base}.{a.name}" in modules:
            aliases[a.asname or a.name] = f"{base}.{a.name}"
      elif isinstance(node, ast.Import):
        for a in node.names:
          if a.asname and a.name in modules:
            aliases[a.asname] = a.name
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and _private(node.attr)
          and aliases[node.value.id] != module):
        offences.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
  assert not offences, "private names used across modules:\n" + "\n".join(offences)


def test_every_module_imports_in_a_fresh_interpreter():
  """Every module imports in a fresh interpreter, in sorted and in reverse order (a module
  that only works once another was imported before it fails in one of the two)."""
  modules = sorted(module_files())
  script = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "  importlib.import_module(name)\n")
  for order in (modules, modules[::-1]):
    proc = subprocess.run([sys.executable, "-c", script, *order], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_metrics_writer_does_not_import_torch(tmp_path):
  """tensorboardX imports torch when it is installed (3.4 s of every training run's start
  here); the trainer's writer hides it and writes its events all the same, and torch still
  imports afterwards."""
  script = ("import sys\n"
            "import numpy as np\n"
            "from segvit_jax import trainer\n"
            "w = trainer.MetricsWriter(sys.argv[1])\n"
            "w.write(1, {'loss': 0.5})\n"
            "w.images(1, {'val/0': np.zeros((4, 4, 3), np.uint8)})\n"
            "w.close()\n"
            "print('torch' in sys.modules)\n"
            "import torch\n"
            "print(torch.zeros(2).sum().item())\n")
  proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["False", "0.0"]
  assert os.listdir(tmp_path / "tb") and (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
