"""Where a result came from: git commit, machine, packages; and the one way this repo runs DVC.

from llmft.env import dvc, write_environment
write_environment("reports/env/train.json", "train")   # the stage's environment manifest
dvc("params", "diff", "HEAD~1", "--md")               # stdout, or a UserError with DVC's message
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from llmft.common import UserError, atomic_write_json


def run_dvc(
    *args: str, cwd: str | os.PathLike | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """`dvc <args>` with this interpreter's DVC (the venv's, whatever PATH says), output captured.

    It runs in `cwd`, by default the current directory: the repo is the one the user (or make) works in, never the
    folder this package was installed from (an editable install points at one checkout; copies share its venv).
    """
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def dvc(*args: str, cwd: str | os.PathLike | None = None) -> str:
    """`dvc <args>`: its stdout, or a UserError with the last line DVC printed."""
    proc = run_dvc(*args, cwd=cwd)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise UserError(f"dvc {' '.join(args)} failed" + (f": {lines[-1]}" if lines else ""))
    return proc.stdout


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """`git describe --always --dirty` in `cwd` (default: here; -dirty = uncommitted changes), or "unknown"."""
    proc = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=cwd, check=False
    )
    return proc.stdout.strip() or "unknown"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform says."""
    try:
        return next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown"


def available_memory() -> int:
    """MemAvailable in bytes (it counts the page cache the kernel can drop); 0 where unknown."""
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        return 1024 * int(next(line.split()[1] for line in meminfo if line.startswith("MemAvailable")))
    except (OSError, StopIteration, ValueError):
        return 0


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, Any]:
    """What produced a result: Python, every installed package, torch/CUDA, the device, the git commit."""
    env: dict[str, Any] = {
        "git_commit": git_commit(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    env["device"] = f"cpu: {cpu_name()}"
    if "torch" in sys.modules:  # stages that never load torch (prepare) don't pay its import for this
        torch = sys.modules["torch"]

        env["torch"] = {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "num_threads": torch.get_num_threads(),
        }
        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            env["device"] = f"cuda: {len(names)} x {names[0]}" if len(set(names)) == 1 else "cuda: " + ", ".join(names)
    env["packages"] = dict(
        sorted(
            {
                d.metadata["Name"].lower(): d.version for d in importlib.metadata.distributions() if d.metadata["Name"]
            }.items()
        )
    )
    return env


def write_environment(path: str | os.PathLike, stage: str) -> None:
    """A stage's environment manifest: see `environment`. No timestamp: the same code on the same machine
    writes the same bytes, so a rerun doesn't change the output's hash. A DVC output (cached), not `cache:
    false`: an uncached output would keep DVC from restoring the stage from its run-cache."""
    atomic_write_json(path, {"stage": stage, **environment()})
