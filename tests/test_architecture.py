"""Imports flow one way: model (torch only) <- core (no Qt, no napari) <- the napari layer."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "napari_sam"
STDLIB = set(sys.stdlib_module_names)
GUI = {"napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy", "npe2"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((PKG / "model").glob("*.py")), ids=lambda p: p.name)
def test_model_imports_only_torch(path):
    assert _imports(path) - STDLIB - {"torch", "__future__"} == set()


@pytest.mark.parametrize("path", sorted((PKG / "core").glob("*.py")), ids=lambda p: p.name)
def test_core_never_imports_gui(path):
    assert _imports(path) & GUI == set()


def test_core_and_model_have_modules():
    assert len(list((PKG / "model").glob("*.py"))) >= 6
    assert len(list((PKG / "core").glob("*.py"))) >= 5


def test_importing_the_package_loads_neither_torch_nor_qt():
    code = "import sys, napari_sam, napari_sam.weights; print(sorted(m for m in ('torch', 'qtpy', 'PyQt5', 'napari') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_public_api_resolves_lazily():
    code = (
        "import sys, napari_sam; assert 'torch' not in sys.modules; "
        "from napari_sam import load_model, Predictor, list_models; "
        "print(load_model.__module__, Predictor.__name__, len(list_models()) > 5)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "napari_sam.core.models Predictor True"


def _package_imports(path: Path) -> set[str]:
    """Modules of napari_sam that ``path`` imports (relative imports resolved)."""
    rel = path.relative_to(PKG.parent).with_suffix("").parts  # ('napari_sam', 'core', 'x')
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel[: len(rel) - node.level])
                out.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module and node.module.startswith("napari_sam"):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("napari_sam")}
    return out


# layer -> the napari_sam modules it must never import
FORBIDDEN = {
    "core": ("napari_sam.api", "napari_sam.layers", "napari_sam._qt", "napari_sam.cli"),
    "api": ("napari_sam._qt", "napari_sam.cli"),
    "layers": ("napari_sam._qt", "napari_sam.cli"),
}


@pytest.mark.parametrize(
    "path", sorted([*(PKG / "core").glob("*.py"), PKG / "api.py", PKG / "layers.py"]), ids=lambda p: p.stem
)
def test_imports_flow_one_way(path):
    layer = "core" if path.parent.name == "core" else path.stem
    bad = {m for m in _package_imports(path) if m.startswith(FORBIDDEN[layer])}
    assert bad == set()


@pytest.mark.parametrize("path", [PKG / "api.py", PKG / "layers.py"], ids=lambda p: p.stem)
def test_api_and_layers_use_no_qt(path):
    assert _imports(path) & (GUI - {"napari"}) == set()
