"""The package's layering: each layer imports only the layers below it, and nothing imports the package root.

Read from the source (every import statement, those inside functions included), so a new import
that breaks the architecture fails here before it can form an import cycle.
"""

import ast
from pathlib import Path

import pytest

import eetq_lora

SOURCE = Path(eetq_lora.__file__).parent

# Bottom to top. A module may import its own package and any layer listed before it; the utilities
# (first entry) may also import each other.
LAYERS = [
    {"_version", "atomic", "cache", "errors", "packages"},
    {"format"},
    {"kernels"},
    {"quant"},
    {"integrations"},
    {"lora"},
    {"parallel"},
    {"data"},
    {"models"},
    {"training"},
    {"cli"},
]
# Import rules beyond the order: the LoRA layer reaches the int8 matmul only through EetqLinear.
FORBIDDEN = {("lora", "kernels")}


def _rank(part: str) -> int:
    for rank, layer in enumerate(LAYERS):
        if part in layer:
            return rank
    raise AssertionError(f"eetq_lora.{part} is in no layer: add it to LAYERS in {__file__}")


def _module_name(path: Path) -> tuple[str, ...]:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path) -> list[tuple[tuple[str, ...], int]]:
    """(imported module path inside eetq_lora, line) for every eetq_lora import in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = base + tuple(node.module.split(".")) if node.module else base
            found.append((target, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "eetq_lora":
            found.append((tuple(node.module.split("."))[1:], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "eetq_lora":
                    found.append((tuple(alias.name.split("."))[1:], node.lineno))
    return found


SOURCES = sorted(p for p in SOURCE.rglob("*.py") if _module_name(p) and _module_name(p)[0] != "__main__")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_imports_follow_the_layers(path):
    importer = _module_name(path)[0]
    for target, line in _imports(path):
        where = f"{path.relative_to(SOURCE)}:{line}"
        assert target, f"{where} imports the package root; import from the defining module instead"
        imported = target[0]
        if imported == importer:
            continue
        below = _rank(imported) < _rank(importer) or _rank(imported) == _rank(importer) == 0
        assert below, f"{where}: eetq_lora.{importer} imports eetq_lora.{imported}, which is not a layer below it"
        assert (importer, imported) not in FORBIDDEN, f"{where}: eetq_lora.{importer} must not import {imported}"


def _names_taken_from_packages(path: Path) -> list[tuple[str, str, int]]:
    """(package, name, line) for each name imported from a package's ``__init__`` rather than a module."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[: len(package) - (node.level - 1)]
            target = base + tuple(node.module.split(".")) if node.module else base
        elif node.module and node.module.split(".")[0] == "eetq_lora":
            target = tuple(node.module.split("."))[1:]
        else:
            continue
        folder = SOURCE.joinpath(*target)
        if not (folder / "__init__.py").is_file():
            continue
        for alias in node.names:
            if not ((folder / f"{alias.name}.py").is_file() or (folder / alias.name / "__init__.py").is_file()):
                found.append(("/".join(target) or "eetq_lora", alias.name, node.lineno))
    return found


@pytest.mark.parametrize(
    "path", [p for p in SOURCES if p.name != "__init__.py"], ids=lambda p: str(p.relative_to(SOURCE))
)
def test_modules_import_names_from_their_defining_module(path):
    # A package's __init__ is its public face; inside the package tree, names come from where they
    # are defined, so moving a re-export never breaks (or cycles) an internal import.
    for package, name, line in _names_taken_from_packages(path):
        raise AssertionError(
            f"{path.relative_to(SOURCE)}:{line} imports {name!r} from the package {package}; "
            "import it from the module that defines it"
        )


def test_the_checker_sees_imports_of_every_kind(tmp_path, monkeypatch):
    # A self-check: relative, absolute and in-function imports are all found.
    module = SOURCE / "lora" / "layer.py"
    found = {target for target, _ in _imports(module)}
    assert ("quant", "linear") in found
    text = "def f():\n    from ..kernels import dispatch\n    import eetq_lora.cli.main\nfrom .. import EetqLinear\n"
    fake = tmp_path / "fake.py"
    fake.write_text(text)
    monkeypatch.setattr("tests.test_layering._module_name", lambda path: ("lora", "fake"))
    assert {target for target, _ in _imports(fake)} == {("kernels",), ("cli", "main"), ()}
    assert [(package, name) for package, name, _ in _names_taken_from_packages(fake)] == [("eetq_lora", "EetqLinear")]
    fake.write_text(
        "from ..data import load_file\nfrom ..data import files\nfrom ..kernels.dispatch import int8_linear\n"
    )
    assert [(package, name) for package, name, _ in _names_taken_from_packages(fake)] == [("data", "load_file")]
