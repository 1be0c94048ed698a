"""The engine's precision: the `auto` setting resolved for the hardware the replica runs on.

vLLM's own `auto` keeps a checkpoint's 16-bit dtype and turns a float32 checkpoint into bfloat16
on every x86 CPU. That is the fastest choice only where the CPU computes bfloat16 natively (AMX or
AVX512-BF16 on x86, the BF16 extension on Arm); elsewhere bfloat16 matmuls are emulated and float32
is faster. So `auto` here means:

* a GPU: vLLM's own `auto`;
* a CPU with native bfloat16: `bfloat16`;
* any other CPU: `float32`.

An explicit dtype is passed through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 (/proc/cpuinfo "flags"), Arm ("Features")


@dataclass(frozen=True)
class Precision:
    dtype: str  # what the engine is given: "bfloat16", "float32", "float16" or "auto" (a GPU's choice)
    reason: str  # one line for the start-up log


def cpu_bf16_flags(cpuinfo: str) -> list[str]:
    """The native-bfloat16 flags among the CPU's feature flags (first processor listed)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            present = set(value.split())
            return [flag for flag in CPU_BF16_FLAGS if flag in present]
    return []


def _has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_precision(setting: str, *, cpuinfo_path: Path = Path("/proc/cpuinfo"),
                      has_gpu: bool | None = None) -> Precision:
    """The dtype the engine should run for `setting` ("auto" or an explicit dtype)."""
    if setting != "auto":
        return Precision(setting, f"{setting} (set explicitly)")
    if _has_gpu() if has_gpu is None else has_gpu:
        return Precision("auto", "auto (a GPU: vLLM picks from the checkpoint)")
    try:
        flags = cpu_bf16_flags(cpuinfo_path.read_text())
    except OSError:
        flags = []
    if flags:
        return Precision("bfloat16", f"bfloat16 (auto: the CPU computes bfloat16 natively: {', '.join(flags)})")
    return Precision("float32", "float32 (auto: the CPU has no native bfloat16, float32 is faster)")
