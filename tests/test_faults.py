"""Real faults against real processes: SIGKILL mid-run, a full disk, two runs sharing a cache.

Each case runs `mmtag train` as a subprocess on tiny demo data (a cached-feature config) and
compares what it ends with against one uninterrupted run of the same config.
"""

import importlib.util
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from mmtag.config import load_config
from mmtag.training import loop

ROOT = Path(__file__).resolve().parents[1]
# frozen stages [0, 5) cached, the rest trains: the demo recipe's shape, tiny
CACHED = ["data.image_size=64", "data.num_workers=0", "model.pretrained=false",
          "model.freeze_image=5", "model.lstm_hidden=8", "model.hidden=16", "optim.batch_size=8",
          "optim.epochs=2", "data.len_quantile=1.0", "cache.num_workers=0"]


def _tool():
    spec = importlib.util.spec_from_file_location("fault_inject", ROOT / "tools" / "fault_inject.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fault_inject = _tool()


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    loop.fit(load_config(None, [*CACHED, f"cache.dir={root / 'cache'}"]), demo, root / "run",
             progress=False)
    return fault_inject.fingerprint(root / "run")


def train_cmd(demo, run, cache):
    sets = [x for o in [*CACHED, f"cache.dir={cache}"] for x in ("--set", o)]
    return [sys.executable, "-m", "mmtag", "train", "--data", str(demo), "--out", str(run), *sets]


def test_killed_after_its_first_checkpoint_a_run_resumes_byte_identical(demo, reference,
                                                                        tmp_path):
    run, cache, log = tmp_path / "run", tmp_path / "cache", tmp_path / "train.log"
    cmd = train_cmd(demo, run, cache)
    # SIGKILL while last.pt is being written (or just after): the hardest moment to resume from
    assert fault_inject.kill_at(cmd, log, target="last.pt write", run=run, cache=cache)
    assert not (run / "summary.json").exists()
    assert fault_inject.resume(demo, run, cmd, log) == "--resume"
    assert fault_inject.differences(reference, fault_inject.fingerprint(run)) == []


def assert_resumes_identical(demo, run, reference):
    """`mmtag train --resume` (with room again) ends like the uninterrupted run."""
    res = subprocess.run([sys.executable, "-m", "mmtag", "train", "--resume", str(run), "--data",
                          str(demo)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert fault_inject.differences(reference, fault_inject.fingerprint(run)) == []


def _limit_file_size(nbytes):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return set_limit


@pytest.mark.slow
def test_a_full_disk_is_a_clear_error_and_the_next_run_trusts_no_partial_file(demo, reference,
                                                                             tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    # files may grow to 200 kB: the small run files and the cache entries fit, the checkpoints
    # do not (as on a disk that fills up during the first checkpoint)
    res = subprocess.run(train_cmd(demo, run, cache), capture_output=True, text=True,
                         preexec_fn=_limit_file_size(200_000))
    assert res.returncode == 5, res.stderr[-2000:]
    err = res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr
    assert err.startswith("mmtag train: error: could not write ") and "free some disk space" in err
    assert not list(run.glob("*.pt")) and not list(run.glob(".*.tmp"))
    assert any(cache.rglob("*.npy"))
    # with space again: the same command continues; nothing half-written is read
    assert_resumes_identical(demo, run, reference)


@pytest.mark.slow
def test_a_cache_entry_cut_short_by_a_full_disk_is_never_read(demo, reference, tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    res = subprocess.run(train_cmd(demo, run, cache), capture_output=True, text=True,
                         preexec_fn=_limit_file_size(2_500))  # smaller than one cache entry
    assert res.returncode == 5 and "could not write" in res.stderr and "Traceback" not in res.stderr
    assert not list(cache.rglob("*.npy")) and not list(cache.rglob("*.tmp"))
    assert_resumes_identical(demo, run, reference)


@pytest.mark.slow
def test_two_runs_sharing_one_cache_folder_at_once_both_end_correct(demo, reference, tmp_path):
    cache = tmp_path / "cache"
    procs = [subprocess.Popen(train_cmd(demo, tmp_path / f"run{i}", cache),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    for i in range(2):
        assert fault_inject.differences(reference, fault_inject.fingerprint(tmp_path / f"run{i}")) == []
    assert json.loads((tmp_path / "run0" / "summary.json").read_text())["val_rows"] == 8
