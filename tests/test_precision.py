"""amp: auto never picks a precision slower than fp32 on the machine it runs on."""

import pytest
import torch

from mmtag import runtime
from mmtag.config import load_config, recipe_path
from mmtag.runtime import choose_precision, inference_precision, slow_precision_warning

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.fixture(params=["", "avx512_bf16", "amx"], ids=["avx2-cpu", "avx512bf16-cpu", "amx-cpu"])
def bf16_kind(request, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_bf16_kind", lambda: request.param)
    return request.param


def test_auto_is_bf16_only_where_it_was_measured_faster(bf16_kind):
    p = choose_precision("auto", CPU)
    # AMX: bf16; AVX512-BF16 without AMX: a bf16 training step ran at 0.68x fp32's speed
    assert p.dtype == (torch.bfloat16 if bf16_kind == "amx" else None)
    assert p.name == ("bf16" if bf16_kind == "amx" else "fp32")
    assert {"amx": "has AMX", "avx512_bf16": "0.68x", "": "has no native bf16"}[bf16_kind] \
        in p.reason
    assert p.to_dict() == {"amp": "auto", "dtype": p.name, "reason": p.reason}
    assert slow_precision_warning(p, CPU) is None


def test_auto_elsewhere(bf16_kind):
    assert choose_precision("auto", CUDA).dtype == torch.bfloat16
    assert choose_precision("auto", MPS).dtype is None
    assert choose_precision("none", CUDA).dtype is None


def test_explicit_half_precision_is_kept_and_warned_on_a_cpu_without_it(bf16_kind):
    for amp, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        p = choose_precision(amp, CPU)
        assert p.dtype == dtype  # the user asked: obeyed, with a warning where it is emulated
        warning = slow_precision_warning(p, CPU)
        assert (warning is None) == bool(bf16_kind)
        if warning:
            assert f"amp={amp}" in warning and "amp=auto" in warning


def test_prediction_drops_an_emulated_half_precision(bf16_kind):
    p = inference_precision("bf16", CPU)
    assert p.dtype == (torch.bfloat16 if bf16_kind else None)
    if not bf16_kind:
        assert "dropped for prediction" in p.reason
    assert inference_precision("bf16", CUDA).dtype == torch.bfloat16
    assert inference_precision("none", CPU).dtype is None


@pytest.mark.parametrize("recipe", ["cpu", "cpu-fast"])
def test_cpu_recipes_use_auto(recipe):
    assert load_config(recipe_path(recipe), []).amp == "auto"


@pytest.mark.parametrize(("flags", "cap", "kind"), [
    ({"avx2", "fma"}, None, ""),                            # AVX2 only: torch alone would say no
    ({"avx512f", "avx512bw"}, None, ""),                    # AVX-512 without BF16: emulated
    ({"avx512f", "avx512_bf16"}, None, "avx512_bf16"),
    ({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, None, "amx"),
    ({"avx512f", "avx512_bf16"}, "AVX512_CORE", ""),        # oneDNN capped below BF16
    ({"avx512f", "avx512_bf16"}, "avx512_core_bf16", "avx512_bf16"),
    ({"avx512f", "avx512_bf16", "amx_bf16"}, "AVX512_CORE_BF16", "avx512_bf16"),  # AMX capped
])
def test_native_bf16_needs_the_cpu_flag_and_onednn_allowing_it(flags, cap, kind, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True,
                        raising=False)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: flags)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert runtime.cpu_bf16_kind() == kind
    assert runtime.cpu_has_fast_bf16() is bool(kind)
