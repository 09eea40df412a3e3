"""The package's layers hold: lower modules never import upper ones, nothing outside a model reads its private state.

Layers, lowest first (docs/architecture.md): plain file I/O; image decoding and the torch-free inference path
(preprocessing, postprocessing, ONNX back end); torch math (model components, torch models, metrics, export);
Lightning glue (LightningModules, data module, DDP); run directories; callbacks; commands and the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "aoi_lightning"
CALLBACKS = ROOT / "callbacks"


def _module_name(path: Path) -> str:
    if path.is_relative_to(CALLBACKS):
        rel = path.relative_to(CALLBACKS).with_suffix("")
        parts = ["aoi_lightning", "callbacks", *rel.parts]
    else:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    files = [*PACKAGE.rglob("*.py"), *CALLBACKS.rglob("*.py")]
    return {_module_name(p): p for p in files}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) of a source file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # imports under `if TYPE_CHECKING:` / try blocks at module level count as top level
        if isinstance(node, (ast.If, ast.Try)):
            top_level.update(id(n) for n in ast.walk(node))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, id(node) in top_level))
            out += [(f"{node.module}.{alias.name}", id(node) in top_level) for alias in node.names]
    return out


def _matches(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


#: (modules the rule applies to, modules they must never import, anywhere in the file)
RULES = [
    (("aoi_lightning.fileio",), ("aoi_lightning", "torch", "lightning", "numpy")),
    (("aoi_lightning.progress",), ("aoi_lightning", "torch", "lightning", "numpy")),
    (
        (
            "aoi_lightning.models.components",
            "aoi_lightning.models.padim.torch_model",
            "aoi_lightning.models.patchcore.torch_model",
        ),
        (
            "lightning",
            "aoi_lightning.data",
            "aoi_lightning.rundir",
            "aoi_lightning.inference",
            "aoi_lightning.commands",
            "aoi_lightning.callbacks",
            "aoi_lightning.report",
            "aoi_lightning.compare",
            "aoi_lightning.cli",
            "aoi_lightning.distributed",
            "aoi_lightning.models.lightning_base",
        ),
    ),
    (("aoi_lightning.distributed",), ("aoi_lightning.models",)),
    (  # the export takes model inputs (data.preprocess, the bottom layer), never the data set machinery
        ("aoi_lightning.export",),
        (
            "aoi_lightning.data.mvtec",
            "aoi_lightning.data.datamodule",
            "aoi_lightning.data.synthetic",
            "aoi_lightning.data.check",
            "aoi_lightning.commands",
            "aoi_lightning.callbacks",
        ),
    ),
    (
        (
            "aoi_lightning.postprocess",
            "aoi_lightning.data.image_io",
            "aoi_lightning.metrics",
            "aoi_lightning.thresholds",
        ),
        ("aoi_lightning.rundir", "aoi_lightning.commands", "aoi_lightning.callbacks", "aoi_lightning.models"),
    ),
    (("aoi_lightning.data",), ("aoi_lightning.postprocess", "aoi_lightning.commands", "aoi_lightning.callbacks")),
    (("aoi_lightning",), ("aoi_lightning.callbacks",)),  # the library never imports the callbacks (YAML wires them)
]

#: Modules on the torch-free line install's path: no torch / Lightning / timm / kornia at import time.
TORCH_FREE = (
    "aoi_lightning.cli",
    "aoi_lightning.fileio",
    "aoi_lightning.progress",
    "aoi_lightning.data.image_io",
    "aoi_lightning.postprocess",
    "aoi_lightning.inference.folder",
    "aoi_lightning.inference.onnx_backend",
    "aoi_lightning.commands.run",
    "aoi_lightning.serve",
    "aoi_lightning.commands.serve",
)


def _violations(rule_modules: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for name, path in _sources().items():
        if not _matches(name, rule_modules) or _matches(name, forbidden):  # a package may import itself
            continue
        for imported, _ in _imports(path):
            if _matches(imported, forbidden):
                out.append(f"{name} imports {imported}")
    return out


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule[0][0])
def test_lower_layers_import_no_upper_one(rule) -> None:
    assert _violations(*rule) == []


def test_torch_free_path_imports_no_torch_at_module_level() -> None:
    heavy = ("torch", "lightning", "timm", "kornia", "torchmetrics")
    found = []
    for name, path in _sources().items():
        if _matches(name, TORCH_FREE):
            found += [f"{name} imports {m}" for m, top in _imports(path) if top and _matches(m, heavy)]
    assert found == []


def _private_model_attributes() -> set[str]:
    """`self._x` attributes the torch models and their components set."""
    names = set()
    for path in (PACKAGE / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.ctx, ast.Store)
            ):
                names.add(node.attr)
    return names


def test_no_code_outside_the_models_reads_their_private_state() -> None:
    private = _private_model_attributes()
    assert {"_bank", "_moments", "_searcher"} <= private  # the scan sees the models' private state
    found = []
    for path in [*PACKAGE.rglob("*.py"), *CALLBACKS.rglob("*.py"), *(ROOT / "tools").rglob("*.py")]:
        if path.is_relative_to(PACKAGE / "models"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in private:
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert found == []
