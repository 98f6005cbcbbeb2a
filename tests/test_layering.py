"""The package's layers: no module imports from a layer above it (read from the source, nothing runs)."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lusd_jax"

# What a model file may import from the project: its siblings and the leaf modules below them.
MODEL_DEPENDENCIES = {
  "lusd_jax.models",
  "lusd_jax.kernels",  # the Pallas attention kernels the registry dispatches to (floor 0, no model imports)
  "lusd_jax.configs",
  "lusd_jax.weights",
  "lusd_jax.tokenizer",
  "lusd_jax.compiler",
  "lusd_jax.tiny",
}


def _project_imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, module) of every import of a project module in `path`, function-level imports included."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from lusd_jax import loading` imports the module lusd_jax.loading.
      out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
  return [(line, m) for line, m in out if m.split(".")[0] in ("lusd_jax", "convert")]


def _under(module: str, allowed: set[str]) -> bool:
  return any(module == a or module.startswith(a + ".") for a in allowed)


@pytest.mark.parametrize("path", sorted((PACKAGE / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_import_no_loader_pipeline_or_cli(path):
  bad = [f"line {line}: {m}" for line, m in _project_imports(path) if not _under(m, MODEL_DEPENDENCIES)]
  assert not bad, f"{path.name} imports from a layer above the models: {bad}"


def _top_level_imports(path: pathlib.Path) -> set[str]:
  """The project modules `path` imports at module level (not inside a function)."""
  tree = ast.parse(path.read_text(encoding="utf-8"))
  return {
    f"{node.module}.{a.name}"
    for node in tree.body
    if isinstance(node, ast.ImportFrom) and node.module
    for a in node.names
  }


def test_version_has_one_source():
  import tomllib

  import lusd_jax
  from lusd_jax import pipeline, version

  # pyproject's version is lusd_jax/version.py's (setuptools reads the attribute when building).
  pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))
  assert "version" in pyproject["project"]["dynamic"] and "version" not in pyproject["project"]
  assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lusd_jax.version.__version__"}
  assert version.__version__ == lusd_jax.__version__
  # The pipeline reads it at import (no lazy import hiding a cycle through the package root).
  assert "lusd_jax.version.__version__" in _top_level_imports(PACKAGE / "pipeline.py")
  assert pipeline.__version__ is version.__version__


def test_package_imports_no_top_level_project_package():
  # Conversion lives in lusd_jax/convert.py; a top-level package importing back into lusd_jax (and
  # lusd_jax importing it) made a cycle across the package boundary.
  bad = [
    f"{p.relative_to(PACKAGE)} line {line}: {m}"
    for p in sorted(PACKAGE.rglob("*.py"))
    for line, m in _project_imports(p)
    if not m.startswith("lusd_jax")
  ]
  assert not bad
  assert not (PACKAGE.parent / "convert").exists()


# The floors of README's "Architecture", bottom to top: a module imports only its floor and below.
FLOORS = (
  (
    "lusd_jax.version", "lusd_jax.configs", "lusd_jax.compiler", "lusd_jax.compilation_cache",
    "lusd_jax.io", "lusd_jax.batchdir", "lusd_jax.datasets", "lusd_jax.tokenizer", "lusd_jax.tiny", "lusd_jax.weights",
    "lusd_jax.schedule", "lusd_jax.sharding", "lusd_jax.prompts", "lusd_jax.visual",
    "lusd_jax.examples", "lusd_jax.models", "lusd_jax.kernels", "lusd_jax.distributed",
  ),
  ("lusd_jax.loading", "lusd_jax.convert"),
  ("lusd_jax.engine", "lusd_jax.inversion"),
  ("lusd_jax.lusd", "lusd_jax.unifyedit.config", "lusd_jax.unifyedit.losses", "lusd_jax.unifyedit.core"),
  ("lusd_jax.methods", "lusd_jax.prepare"),
  (
    "lusd_jax.pipeline", "lusd_jax.sweeps", "lusd_jax.evaluation", "lusd_jax.reconstruction",
    "lusd_jax.unifyedit",  # the method's face (`edit`, `pipeline`); its algorithm is on floor 3
  ),
  ("lusd_jax.cli",),
)  # fmt: skip


def _floor(module: str) -> int:
  """The floor of the most specific FLOORS entry that holds `module`."""
  found = [(len(name), i) for i, names in enumerate(FLOORS) for name in names if _under(module, {name})]
  if found:
    return max(found)[1]
  raise AssertionError(f"{module} is on no floor of FLOORS: place it (and in README's diagram)")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize(
  "path", [p for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "__init__.py"], ids=_module_name
)
def test_no_module_imports_from_a_floor_above(path):
  me = _floor(_module_name(path))
  up = []
  for line, imported in _project_imports(path):
    target = imported
    while target.count(".") > 1 and not (PACKAGE.parent / (target.replace(".", "/") + ".py")).exists():
      target = target.rsplit(".", 1)[0]  # `from lusd_jax.io import InputError` -> lusd_jax.io
    if target != "lusd_jax" and _floor(target) > me:
      up.append(f"line {line}: {imported}")
  assert not up, f"{_module_name(path)} (floor {me}) imports from above: {up}"
