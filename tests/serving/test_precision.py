"""The engine's `auto` precision, resolved from the CPU's feature flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.config import EngineConfig
from serving.precision import cpu_bf16_flags, resolve_precision

X86_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\nprocessor\t: 1\n"
X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


@pytest.mark.parametrize(("cpuinfo", "dtype"), [(X86_AMX, "bfloat16"), (ARM_BF16, "bfloat16"),
                                                (X86_AVX2, "float32"), ("", "float32")])
def test_auto_is_bfloat16_only_where_the_cpu_computes_it_natively(tmp_path: Path, cpuinfo: str, dtype: str) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(cpuinfo)
    assert resolve_precision("auto", cpuinfo_path=info, has_gpu=False).dtype == dtype


def test_auto_on_a_gpu_and_explicit_settings_are_left_to_vllm(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(X86_AMX)
    assert resolve_precision("auto", cpuinfo_path=info, has_gpu=True).dtype == "auto"
    for dtype in ("float32", "bfloat16", "float16"):
        assert resolve_precision(dtype, cpuinfo_path=info, has_gpu=False).dtype == dtype


def test_an_unreadable_cpuinfo_means_float32(tmp_path: Path) -> None:
    assert resolve_precision("auto", cpuinfo_path=tmp_path / "missing", has_gpu=False).dtype == "float32"


def test_the_flags_named_are_the_ones_present() -> None:
    assert cpu_bf16_flags(X86_AMX) == ["amx_bf16", "avx512_bf16"]
    assert cpu_bf16_flags(X86_AVX2) == []


def test_the_default_setting_is_auto_and_this_machine_resolves_it() -> None:
    assert EngineConfig().dtype == "auto"
    expected = "bfloat16" if cpu_bf16_flags(Path("/proc/cpuinfo").read_text()) else "float32"
    assert resolve_precision("auto", has_gpu=False).dtype == expected
