"""The package's shape: imports flow one way, no private names cross modules, no process-wide
side effects outside the explicit setup call, functions stay short."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "mmtag"
MODULES = sorted(p for p in SRC.rglob("*.py"))

# layer -> the mmtag packages it must not import (lower layers never import higher ones)
FORBIDDEN = {
    "data": ("mmtag.models", "mmtag.evaluation", "mmtag.training", "mmtag.inference",
             "mmtag.reporting", "mmtag.api", "mmtag.cli"),
    "models": ("mmtag.evaluation", "mmtag.training", "mmtag.inference", "mmtag.reporting",
               "mmtag.api", "mmtag.cli"),
    "evaluation": ("mmtag.models", "mmtag.training", "mmtag.inference", "mmtag.reporting",
                   "mmtag.api", "mmtag.cli"),
    "training": ("mmtag.inference", "mmtag.reporting.report", "mmtag.api", "mmtag.cli"),
    "inference": ("mmtag.api", "mmtag.cli"),
}


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import in `path`, relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = ".".join(("mmtag", *path.relative_to(SRC).parent.parts))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, mod] if mod else base)
            out.append((mod, [a.name for a in node.names], node.lineno))
    return out


def _layer(path: Path) -> str:
    parts = path.relative_to(SRC).parts
    return parts[0] if len(parts) > 1 else path.stem


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_flow_one_way(path):
    banned = FORBIDDEN.get(_layer(path), ())
    bad = [f"line {line}: {mod}" for mod, _, line in _imports(path)
           if any(mod == b or mod.startswith(b + ".") for b in banned)]
    assert not bad, f"{path.relative_to(SRC)} imports a higher layer: {bad}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_private_name_is_imported_from_another_module(path):
    bad = [f"line {line}: {name} from {mod}" for mod, names, line in _imports(path)
           if mod.startswith("mmtag") for name in names if name.startswith("_")]
    assert not bad, f"{path.relative_to(SRC)} imports private names: {bad}"


def test_process_wide_settings_are_made_only_by_the_explicit_setup_calls():
    owners = {"process.py": ("OMP_WAIT_POLICY", "mallopt", "cudnn.benchmark"),
              "runtime.py": ("cudnn.benchmark",)}  # set_deterministic, asked for by a config
    for path in MODULES:
        text = path.read_text()
        for needle in ("OMP_WAIT_POLICY", "mallopt", "cudnn.benchmark", "matplotlib.use("):
            if needle in text:
                assert needle in owners.get(path.name, ()), f"{needle} in {path.relative_to(SRC)}"


def test_the_layout_test_sees_a_violation(tmp_path, monkeypatch):
    """A module of `data/` importing training is caught (the test above can fail)."""
    bad = SRC / "data" / "_layout_probe.py"
    try:
        bad.write_text("from mmtag.training.loop import fit\nfrom mmtag.config import _check\n")
        with pytest.raises(AssertionError, match="imports a higher layer"):
            test_imports_flow_one_way(bad)
        with pytest.raises(AssertionError, match="imports private names"):
            test_no_private_name_is_imported_from_another_module(bad)
    finally:
        bad.unlink()
