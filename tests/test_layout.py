"""The package's shape: imports flow one way, no private names cross modules, no process-wide
side effects outside the explicit setup calls."""

import ast
from pathlib import Path, PurePosixPath

import pytest

SRC = Path(__file__).parents[1] / "src" / "mmtag"
MODULES = sorted(str(p.relative_to(SRC).as_posix()) for p in SRC.rglob("*.py"))

# layer -> the mmtag packages it must not import (lower layers never import higher ones)
HIGHER = ("mmtag.api", "mmtag.cli")
FORBIDDEN = {
    "data": ("mmtag.models", "mmtag.evaluation", "mmtag.prediction", "mmtag.training",
             "mmtag.inference", "mmtag.reporting", "mmtag.serving", *HIGHER),
    "models": ("mmtag.evaluation", "mmtag.prediction", "mmtag.training", "mmtag.inference",
               "mmtag.reporting", "mmtag.serving", *HIGHER),
    "evaluation": ("mmtag.models", "mmtag.prediction", "mmtag.training", "mmtag.inference",
                   "mmtag.reporting", "mmtag.serving", *HIGHER),
    # below training and inference alike: what predicting with a run needs
    "prediction": ("mmtag.training", "mmtag.inference", "mmtag.reporting", "mmtag.serving",
                   *HIGHER),
    "training": ("mmtag.inference", "mmtag.reporting", "mmtag.serving", *HIGHER),
    # prediction never needs the training program
    "inference": ("mmtag.training", "mmtag.reporting", "mmtag.serving", *HIGHER),
    "reporting": ("mmtag.serving", "mmtag.cli"),
    "serving": ("mmtag.training", "mmtag.reporting", *HIGHER),
}


def _imports(source: str, rel: str) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import in the module at `rel` (a path under
    src/mmtag), relative imports resolved."""
    package = ".".join(("mmtag", *PurePosixPath(rel).parent.parts))
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, mod] if mod else base)
            out.append((mod, [a.name for a in node.names], node.lineno))
    return out


def layer_violations(source: str, rel: str) -> list[str]:
    parts = PurePosixPath(rel).parts
    banned = FORBIDDEN.get(parts[0] if len(parts) > 1 else "", ())
    return [f"line {line}: {mod}" for mod, _, line in _imports(source, rel)
            if any(mod == b or mod.startswith(b + ".") for b in banned)]


def private_imports(source: str, rel: str) -> list[str]:
    return [f"line {line}: {name} from {mod}" for mod, names, line in _imports(source, rel)
            if mod.startswith("mmtag") for name in names if name.startswith("_")]


@pytest.mark.parametrize("rel", MODULES)
def test_imports_flow_one_way(rel):
    bad = layer_violations((SRC / rel).read_text(), rel)
    assert not bad, f"{rel} imports a higher layer: {bad}"


@pytest.mark.parametrize("rel", MODULES)
def test_no_private_name_is_imported_from_another_module(rel):
    bad = private_imports((SRC / rel).read_text(), rel)
    assert not bad, f"{rel} imports private names: {bad}"


def test_the_checks_see_a_violation():
    probe = "from mmtag.training.loop import fit\nfrom ..config import _check\n"
    assert layer_violations(probe, "data/probe.py") == ["line 1: mmtag.training.loop"]
    assert private_imports(probe, "data/probe.py") == ["line 2: _check from mmtag.config"]
    assert layer_violations(probe, "inference/probe.py") == ["line 1: mmtag.training.loop"]
    assert layer_violations(probe, "reporting/probe.py") == []


def test_process_wide_settings_are_made_only_by_the_explicit_setup_calls():
    owners = {"process.py": ("OMP_WAIT_POLICY", "mallopt", "cudnn.benchmark"),  # the CLI's calls
              "runtime.py": ("cudnn.benchmark",)}  # set_deterministic, asked for by a config
    for rel in MODULES:
        text = (SRC / rel).read_text()
        for needle in ("OMP_WAIT_POLICY", "mallopt", "cudnn.benchmark", "matplotlib.use("):
            if needle in text:
                assert needle in owners.get(rel, ()), f"{needle} in {rel}"


@pytest.mark.parametrize("package", ["mmtag.serving.server", "mmtag.inference.predictor",
                                     "mmtag.inference.export", "mmtag.inference.benchmark"])
def test_prediction_loads_nothing_of_the_training_program(package):
    # the imports at run time, lazy ones included, in a fresh interpreter
    import subprocess
    import sys

    code = (f"import sys, {package}; "
            "print(sorted(m for m in sys.modules if m.startswith('mmtag.training')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", f"{package} loads {out}"


def test_the_run_folder_files_are_named_in_one_module():
    from mmtag import run_files

    names = {v for k, v in vars(run_files).items() if k.endswith("_FILE")}
    assert {"best.pt", "summary.json", "metrics.csv"} <= names
    # comparison folders of `mmtag compare` draw a curves.png of their own
    allowed = {("reporting/compare.py", "curves.png")}
    spelled = sorted((rel, node.value) for rel in MODULES if rel != "run_files.py"
                     for node in ast.walk(ast.parse((SRC / rel).read_text()))
                     if isinstance(node, ast.Constant) and node.value in names
                     and (rel, node.value) not in allowed)
    assert not spelled, f"run folder file names spelled outside mmtag.run_files: {spelled}"


def test_no_function_is_over_60_lines_but_the_argument_parser():
    long = []
    for rel in MODULES:
        for node in ast.walk(ast.parse((SRC / rel).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60 and (rel, node.name) != ("cli.py", "build_parser"):
                    long.append(f"{rel}:{node.name} ({lines} lines)")
    assert not long, f"split these into smaller functions: {long}"


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = node.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return [n for n in names if n not in ("self", "cls")]


def test_at_most_three_functions_take_more_than_6_parameters_and_each_says_why():
    """More parameters travel as one object (PredictOptions, EvalPass, Pass, ...); the few
    functions left with more say why in their docstring ("N parameters on purpose: ...")."""
    many = []
    for rel in MODULES:
        for node in ast.walk(ast.parse((SRC / rel).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = len(_parameters(node))
                if n > 6:
                    many.append((rel, node.name, n, ast.get_docstring(node) or ""))
    assert len(many) <= 3, f"more than 6 parameters: {[m[:3] for m in many]}"
    unexplained = [m[:3] for m in many if f"{m[2]} parameters on purpose" not in m[3]]
    assert not unexplained, f"say why in the docstring: {unexplained}"
