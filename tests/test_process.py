"""The malloc setting that keeps CPU training steps out of the kernel (mmtag.process)."""

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest


def _has_glibc_mallinfo2() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc 2.33 and later
    except OSError:
        return False


glibc = _has_glibc_mallinfo2()


def _run(code: str, **env) -> str:
    """Run `code` in a fresh interpreter (the setting is process-wide) and return its stdout."""
    full_env = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, env=full_env, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not glibc, reason="mallopt is glibc's")
def test_applies_once_on_glibc():
    out = _run("""
        from mmtag.process import keep_freed_memory
        print(keep_freed_memory(), keep_freed_memory())
    """)
    assert out == "True True"


@pytest.mark.skipif(not glibc, reason="mallopt is glibc's")
@pytest.mark.parametrize("on", [False, True])
def test_large_buffers_come_from_the_heap(on):
    # By default glibc serves a 64 MB request by its own mmap (counted in mallinfo2's hblks),
    # which is unmapped on free and page-faulted in again next time; with the setting it comes
    # from the heap and stays there for reuse.
    out = _run(f"""
        import ctypes
        from mmtag.process import keep_freed_memory
        if {on}:
            keep_freed_memory()
        libc = ctypes.CDLL("libc.so.6")
        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                        "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
        libc.mallinfo2.restype = Info
        libc.malloc.restype = ctypes.c_void_p
        before = libc.mallinfo2().hblks
        buf = libc.malloc(64 << 20)
        print(libc.mallinfo2().hblks - before)
    """)
    assert out == ("0" if on else "1")


def test_opt_out_by_environment():
    out = _run("""
        from mmtag.process import keep_freed_memory
        print(keep_freed_memory())
    """, MMTAG_MALLOC="default")
    assert out == "False"


def test_the_cli_setup_loads_no_torch_and_training_setup_turns_on_cudnn_autotuning():
    # `mmtag --help` and check-data stay instant: neither the CLI module nor its first call
    # imports torch; only a process that trains asks for cuDNN autotuning
    out = _run("""
        import sys
        import mmtag.cli
        from mmtag.process import configure_process, configure_training
        configure_process()
        print("torch" in sys.modules)
        configure_training()
        import torch
        print(torch.backends.cudnn.benchmark)
    """)
    assert out.split() == ["False", "True"]
