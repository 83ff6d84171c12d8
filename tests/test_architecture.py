"""The package's layering, checked on the source (docs/architecture.md draws it).

    model (torch only) <- core <- train, auto, evaluate <- api <- layers <- _qt
    cli on api, core and the three products

Every import of a ``napari_sam`` module counts, also one made inside a function: a lazy
import is still a dependency. No module may import a layer above its own, the module
graph has no cycle, and no module grows past :data:`MAX_LINES`.
"""

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "napari_sam"
STDLIB = set(sys.stdlib_module_names)
GUI = {"napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy", "npe2"}
MAX_LINES = 400

LAYERS = {
    "model": set(),
    "weights": {"_registry_entry"},  # the registry of downloadable checkpoints
    "_registry_entry": set(),  # what one registry entry is (a checkpoint and its decoder file), validated
    "core": {"model", "weights"},
    "train": {"core", "model"},
    "auto": {"core", "model"},
    # evaluation runs the automatic modes and the classical baseline it owns
    "evaluate": {"core", "model", "auto"},
    "api": {"core", "model", "weights", "auto"},  # Annotator.segment_everything runs the automatic modes
    "layers": {"api", "core", "model", "auto", "_extras"},
    "_qt": {"layers", "api", "core", "model", "weights", "train", "auto", "_extras"},
    "cli": {"api", "core", "model", "weights", "train", "auto", "evaluate", "_extras"},
    "_sample_data": set(),
    "__init__": {"_lazy"},  # names resolve lazily; checked by the subprocess tests below
    "_lazy": set(),  # the lazy-name mechanism of the package and its subpackages
    "_extras": set(),  # which optional dependencies the viewer parts need, and the pip line
}
"""Each layer and the layers it may import (besides itself)."""

MODULES = sorted(p for p in PKG.rglob("*.py"))


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Top-level names of third-party and standard modules that ``path`` imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _runtime_nodes(tree: ast.AST):
    """Every node, except those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    for node in ast.iter_child_nodes(tree):
        test = node.test if isinstance(node, ast.If) else None
        if test is not None and "TYPE_CHECKING" in ast.unparse(test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _package_imports(path: Path, source: str | None = None, resolvable: bool = True) -> set[str]:
    """Modules of napari_sam that ``path`` (or ``source`` read as if it were that file)
    imports, relative imports resolved, names imported from a package counted as its
    submodules where such files exist; with ``resolvable=False``, the imported modules
    that match no file (a broken import)."""
    package = _module(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "napari_sam":
                target = node.module
            else:
                continue
            out.add(target)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if _path_of(sub) is not None:
                    out.add(sub)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "napari_sam"}
    return {m for m in out if (_path_of(m) is not None) == resolvable}


def _path_of(module: str) -> Path | None:
    if module == "napari_sam":
        return PKG / "__init__.py"
    rel = Path(*module.split(".")[1:])
    for candidate in (PKG / rel.with_suffix(".py"), PKG / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _layer_of_module(module: str) -> str:
    return _layer(_path_of(module))


def _forbidden(path: Path, source: str | None = None) -> list[str]:
    """The napari_sam modules ``path`` imports although its layer may not."""
    layer = _layer(path)
    allowed = LAYERS[layer] | {layer, "__init__", "_lazy"}  # the root's version string; lazy names
    return sorted(m for m in _package_imports(path, source) if _layer_of_module(m) not in allowed)


def _module_graph() -> dict[str, set[str]]:
    graph = {_module(p): {m for m in _package_imports(p) if m != _module(p)} for p in MODULES}
    # a package's __init__ that re-exports its own submodules makes no cycle of ideas
    return {
        name: {d for d in deps if not (name.startswith(d + ".") and _path_of(d).name == "__init__.py")}
        for name, deps in graph.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as err:
        return list(err.args[1])
    return []


def _too_long(source: str) -> bool:
    return len(source.splitlines()) > MAX_LINES


def test_every_module_belongs_to_a_known_layer():
    assert {_layer(p) for p in MODULES} <= set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_flow_one_way(path):
    layer = _layer(path)
    assert _forbidden(path) == [], f"{layer} may import only {sorted(LAYERS[layer] | {layer})}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_every_package_import_names_a_module(path):
    # a lazy import inside a function fails only when that function runs: catch it here
    assert _package_imports(path, resolvable=False) == set()


def test_the_module_graph_has_no_cycle():
    assert _cycle(_module_graph()) == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_modules_stay_small(path):
    assert not _too_long(path.read_text()), f"split {path.name} by idea (limit {MAX_LINES} lines)"


def test_the_checks_can_fail():
    """Probes: an ``api -> layers`` import (inside a function too), a cycle, a long module."""
    api = PKG / "api.py"
    assert _forbidden(api, api.read_text() + "\n\ndef probe():\n    from .layers import ViewerSession\n") == [
        "napari_sam.layers"
    ]
    assert _forbidden(PKG / "core" / "masks.py", "from ..train import Trainer\n") == ["napari_sam.train"]
    graph = _module_graph()
    graph["napari_sam.core.masks"] = graph["napari_sam.core.masks"] | {"napari_sam.core.tiled_segmentation"}
    assert "napari_sam.core.masks" in _cycle(graph)
    assert _too_long("x = 1\n" * (MAX_LINES + 1)) and not _too_long("x = 1\n" * MAX_LINES)
    assert _package_imports(PKG / "layers" / "session.py", "def f():\n    from .core import masks\n", False) == {
        "napari_sam.layers.core"
    }


@pytest.mark.parametrize("path", sorted((PKG / "model").rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_model_imports_only_torch(path):
    assert _imports(path) - STDLIB - {"torch", "__future__"} == set()


@pytest.mark.parametrize(
    "path", [p for p in MODULES if _layer(p) not in ("_qt", "layers", "cli")], ids=lambda p: str(p.relative_to(PKG))
)
def test_headless_layers_never_import_gui(path):
    assert _imports(path) & GUI == set()


@pytest.mark.parametrize(
    "path", [PKG / "api.py", *sorted((PKG / "layers").glob("*.py"))], ids=lambda p: str(p.relative_to(PKG))
)
def test_api_and_layers_use_no_qt(path):
    assert _imports(path) & (GUI - {"napari"}) == set()


def test_importing_the_package_loads_neither_torch_nor_qt():
    code = ("import sys, napari_sam, napari_sam.weights; "
            "print(sorted(m for m in ('torch', 'qtpy', 'PyQt5', 'napari') if m in sys.modules))")
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


def _private_imports(source: str) -> list[str]:
    """Names with a leading underscore imported from the package's other modules."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("napari_sam")):
            found += [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_imports_another_modules_private_names(path):
    # what modules share is public, with a docstring: a private name is the module's own to change
    assert _private_imports(path.read_text()) == []


def test_the_private_import_check_can_fail():
    assert _private_imports("from .candidates import _Candidate, box_nms\n") == ["_Candidate"]
    assert _private_imports("from ..core.masks import iou\nfrom os import _exit\n") == []
