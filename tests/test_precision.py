"""amp: auto never picks a precision slower than fp32 on the machine it runs on."""

import pytest
import torch

from mmtag import runtime
from mmtag.config import load_config, recipe_path
from mmtag.runtime import choose_precision, inference_precision, slow_precision_warning

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.fixture(params=[False, True], ids=["avx2-cpu", "bf16-cpu"])
def native_bf16(request, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: request.param)
    return request.param


def test_auto_is_bf16_only_where_the_cpu_has_it(native_bf16):
    p = choose_precision("auto", CPU)
    assert p.dtype == (torch.bfloat16 if native_bf16 else None)
    assert p.name == ("bf16" if native_bf16 else "fp32")
    assert ("has native bf16" if native_bf16 else "has no native bf16") in p.reason
    assert p.to_dict() == {"amp": "auto", "dtype": p.name, "reason": p.reason}
    assert slow_precision_warning(p, CPU) is None


def test_auto_elsewhere(native_bf16):
    assert choose_precision("auto", CUDA).dtype == torch.bfloat16
    assert choose_precision("auto", MPS).dtype is None
    assert choose_precision("none", CUDA).dtype is None


def test_explicit_half_precision_is_kept_and_warned_on_a_cpu_without_it(native_bf16):
    for amp, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        p = choose_precision(amp, CPU)
        assert p.dtype == dtype  # the user asked: obeyed, with a warning where it is slow
        warning = slow_precision_warning(p, CPU)
        assert (warning is None) == native_bf16
        if warning:
            assert f"amp={amp}" in warning and "amp=auto" in warning


def test_prediction_drops_an_emulated_half_precision(native_bf16):
    p = inference_precision("bf16", CPU)
    assert p.dtype == (torch.bfloat16 if native_bf16 else None)
    if not native_bf16:
        assert "dropped for prediction" in p.reason
    assert inference_precision("bf16", CUDA).dtype == torch.bfloat16
    assert inference_precision("none", CPU).dtype is None


@pytest.mark.parametrize("recipe", ["cpu", "cpu-fast"])
def test_cpu_recipes_use_auto(recipe):
    assert load_config(recipe_path(recipe), []).amp == "auto"


@pytest.mark.parametrize(("flags", "cap", "native"), [
    ({"avx2", "fma"}, None, False),                        # AVX2 only: torch alone would say no
    ({"avx512f", "avx512bw"}, None, False),                # AVX-512 without BF16: emulated
    ({"avx512f", "avx512_bf16"}, None, True),
    ({"avx512f", "amx_bf16", "amx_tile"}, None, True),
    ({"avx512f", "avx512_bf16"}, "AVX512_CORE", False),    # oneDNN capped below BF16
    ({"avx512f", "avx512_bf16"}, "avx512_core_bf16", True),
])
def test_native_bf16_needs_the_cpu_flag_and_onednn_allowing_it(flags, cap, native, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True,
                        raising=False)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: flags)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert runtime.cpu_has_fast_bf16() is native
