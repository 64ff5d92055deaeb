"""What a CPU offers training and generation: bf16 matrix units, cores, and the fast profile's choices for it.

    isa = detect_cpu()        # CpuIsa(avx512_bf16=True, amx_bf16=False, capability="AVX512")
    isa.bf16                  # a native bf16 dot product (AVX512-BF16 or AMX): bf16 matmuls pay off here
    isa.describe()            # "AVX512, avx512_bf16" for the log and train.json

Stock PyTorch sends bf16 linear layers and matmuls to oneDNN, which uses AMX tiles where the CPU has them and
AVX512-BF16 dot products otherwise. Without either, oneDNN emulates bf16 with fp32 arithmetic plus conversions:
slower than plain fp32, so the fast profile keeps fp32 there. torch's own queries come first (they are what
oneDNN dispatches on); /proc/cpuinfo's flags answer where they are missing.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class CpuIsa:
    avx512_bf16: bool = False
    amx_bf16: bool = False
    capability: str = "unknown"  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...

    @property
    def bf16(self) -> bool:
        """A native bf16 dot product: bf16 matmuls run faster than fp32 ones."""
        return self.avx512_bf16 or self.amx_bf16

    def describe(self) -> str:
        flags = [name for name in ("amx_bf16", "avx512_bf16") if getattr(self, name)]
        return ", ".join([self.capability, *flags]) if flags else f"{self.capability}, no bf16 matrix unit"


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


@functools.cache
def detect_cpu() -> CpuIsa:
    """This machine's CPU, as torch's dispatcher sees it (private queries, so each is guarded)."""
    import torch

    flags = _cpuinfo_flags()

    def ask(name: str, flag: str) -> bool:
        query = getattr(torch.cpu, name, None)
        try:
            return bool(query()) if query else flag in flags
        except RuntimeError:
            return flag in flags

    return CpuIsa(
        avx512_bf16=ask("_is_avx512_bf16_supported", "avx512_bf16"),
        amx_bf16=ask("_is_amx_tile_supported", "amx_bf16") and ("amx_bf16" in flags or not flags),
        capability=torch.backends.cpu.get_cpu_capability(),
    )
