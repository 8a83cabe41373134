"""The package's layers depend only downward (README, "Layout"): an import against them fails here."""
import ast
from pathlib import Path

import lgd_cli

ROOT = Path(lgd_cli.__file__).parent
# Top-level names of lgd_cli by layer, lowest first; anything not listed is the command line.
LAYERS = [
    {"__init__", "compat", "files", "errors", "rng"},
    {"config", "modeling", "data"},
    {"engine", "export", "compare"},
]


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0  # the package itself (__version__)
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    return len(LAYERS)


def lgd_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lgd_cli"):
            if node.module == "lgd_cli":
                yield from (f"lgd_cli.{alias.name}" for alias in node.names if alias.name != "__version__")
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("lgd_cli"))


def test_no_module_imports_from_a_higher_layer():
    upward = []
    for path in ROOT.rglob("*.py"):
        module = ".".join(("lgd_cli", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        for imported in lgd_imports(path):
            if layer_of(imported) > layer_of(module):
                upward.append(f"{module} imports {imported}")
    assert upward == []


def test_only_the_command_line_uses_rich():
    users = sorted(str(path.relative_to(ROOT)) for path in ROOT.rglob("*.py")
                   if layer_of("lgd_cli." + path.relative_to(ROOT).parts[0].removesuffix(".py")) < len(LAYERS)
                   and any(name == "rich" or name.startswith("rich.") for name in _imports(path)))
    assert users == []


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from lgd_cli.engine.train import train\nimport lgd_cli.cli\n")
    assert [layer_of(name) for name in lgd_imports(bad)] == [2, 3]
    assert layer_of("lgd_cli.modeling.distiller") == 1 and layer_of("lgd_cli.files") == 0
