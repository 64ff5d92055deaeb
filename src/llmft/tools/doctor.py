"""What this machine gives training: torch build, NVIDIA driver, GPUs, bf16, the fast kernels, free GPU memory.

    make doctor                     # or: python -m llmft.tools.doctor

Read-only; prints one fact per line, then a verdict that says what to fix, if anything. Exit code 0 either way.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform
import sys
from pathlib import Path

from llmft.common import run_main
from llmft.gpu import driver_problem, gpu_names, needed_driver
from llmft.torch_build import Smi, Unsupported, choose, query_smi, vtext

KERNELS = {  # package -> (module, what it is for, how to get it)
    "liger-kernel": ("liger_kernel", "train.profile fast, on CUDA", "pinned: make setup"),
    "flash-attn": ("flash_attn", "train.profile fast, on Ampere or newer", "docs/gpu.md"),
    "bitsandbytes": ("bitsandbytes", "QLoRA, on CUDA", ".venv/bin/pip install bitsandbytes==0.50.2"),
    "deepspeed": ("deepspeed", "train.deepspeed, on CUDA", ".venv/bin/pip install deepspeed"),
}


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def facts(venv: Path = Path(sys.prefix)) -> tuple[list[tuple[str, str]], str]:
    """(label, value) rows and the verdict line."""
    import torch

    smi, cuda, seen = query_smi(), torch.version.cuda, torch.cuda.is_available()
    build = torch.__version__.partition("+")[2] or "?"
    rows = [("python", f"{platform.python_version()} ({sys.executable})")]
    needs = f"CUDA {cuda} build, needs NVIDIA driver >= {vtext(needed_driver(cuda))}" if cuda else "CPU-only build"
    rows.append(("torch", f"{torch.__version__}: {needs}"))
    if (venv / ".torch-cuda").exists():
        rows.append(("make setup", f"TORCH_CUDA={(venv / '.torch-cuda').read_text().strip()} (.venv/.torch-cuda)"))
    rows.append(("NVIDIA driver", smi.problem or f"{smi.driver_text} ({gpu_names(smi)})"))
    if not smi.problem:
        try:
            pick = choose("auto", smi)[0]
            rows.append(("build for it", pick + (" (installed)" if pick == build else f" (installed: {build})")))
        except Unsupported as e:
            rows.append(("build for it", f"none: {e}"))
    rows.append(("CUDA seen", f"yes, {torch.cuda.device_count()} GPU(s)" if seen else "no"))
    for i in range(torch.cuda.device_count() if seen else 0):
        p, (free, total) = torch.cuda.get_device_properties(i), torch.cuda.mem_get_info(i)
        memory = f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
        rows.append((f"cuda:{i}", f"{p.name}, compute capability {p.major}.{p.minor}, {memory}"))
    if seen:
        rows.append(("bf16", "yes" if torch.cuda.is_bf16_supported() else "no: train.precision auto uses fp16"))
    else:
        rows.append(("bf16", "n/a (torch sees no GPU): train.precision auto uses fp32"))
    for dist, (module, use, get) in KERNELS.items():
        have = version(dist) if importlib.util.find_spec(module) else None
        rows.append((dist, f"{have} installed" if have else f"not installed: {use}; {get}"))
    return rows, verdict(smi, cuda, seen, build)


def verdict(smi: Smi, cuda: str | None, seen: bool, build: str) -> str:
    """One line: what training will run on, and the fix when that is not the GPU nvidia-smi shows."""
    problem = driver_problem(smi)
    if problem:
        return ("PROBLEM: " if problem[1] else "WARNING: ") + problem[0]
    if seen:
        sdpa = "" if version("flash-attn") else " (no flash-attn: the fast profile uses PyTorch SDPA attention)"
        return f"OK: training runs on the GPU{sdpa}"
    if not cuda and not smi.problem:
        return (
            f"CPU-ONLY TORCH: nvidia-smi shows {gpu_names(smi)} but torch is the CPU build, so training runs on "
            "the CPU: `make setup TORCH_CUDA=auto` installs the CUDA build for this driver"
        )
    extra = "; `make setup TORCH_CUDA=cpu` would drop the ~3 GB of CUDA libraries torch cannot use here" if cuda else ""
    return f"NO GPU ({smi.problem}): training runs on the CPU in fp32{extra}"


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    rows, verdict = facts()
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label.ljust(width)}  {value}")
    print(verdict)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
