"""Helpers shared by every stage: user-facing errors, logging, atomic writes, seeding, environment manifests.

Stage scripts import from here instead of copying these few lines around:

    from common import UserError, atomic_write_json, get_logger, run_main
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent


class UserError(Exception):
    """A mistake the user can fix (bad file, bad column, bad param).

    `run_main` prints it as one line, without a traceback, and exits with status 2.
    """


def get_logger(name: str) -> logging.Logger:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    return logging.getLogger(name)


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a stage's `main`, turning a `UserError` into a one-line message and exit code 2."""
    try:
        return main(argv) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success move it into place in one rename.

    Works for files and directories. On any exception the temporary is removed and an
    existing `path` is left untouched, so a crash never leaves a half-written output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            old = tmp / ".old"
            os.replace(path, old)  # a directory can't be renamed over a non-empty one
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def dump_json(obj: Any) -> str:
    """The one JSON style of the repo: UTF-8 text (Chinese stays readable, not \\u-escaped), final newline.

    A list is written one item per line: diffs show changed examples, and the C encoder
    is used (an indented dump goes through the pure-Python one, ~5x slower on a big split).
    """
    if isinstance(obj, list):
        if not obj:
            return "[]\n"
        return "[\n" + ",\n".join(json.dumps(item, ensure_ascii=False) for item in obj) + "\n]\n"
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"


def write_json(path: Path, obj: Any) -> None:
    path.write_text(dump_json(obj), encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        write_json(tmp, obj)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (when installed) from one params value."""
    random.seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


def dvc(*args: str) -> str:
    """`dvc <args>` with this environment's DVC, from the repo root: its stdout, or a UserError with DVC's message."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise UserError(f"dvc {' '.join(args)} failed" + (f": {lines[-1]}" if lines else ""))
    return proc.stdout


def git_commit() -> str:
    """`git describe --always --dirty` of the repo (a trailing -dirty: uncommitted changes), or "unknown"."""
    proc = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT,
                          check=False)
    return proc.stdout.strip() or "unknown"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform says."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown"


def environment() -> dict[str, Any]:
    """What produced a result: Python, every installed package, torch/CUDA, the device, the git commit."""
    env: dict[str, Any] = {
        "git_commit": git_commit(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
    }
    env["device"] = f"cpu: {cpu_name()}"
    if "torch" in sys.modules:  # stages that never load torch (prepare) don't pay its import for this
        torch = sys.modules["torch"]

        env["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
                        "num_threads": torch.get_num_threads()}
        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            env["device"] = f"cuda: {len(names)} x {names[0]}" if len(set(names)) == 1 else "cuda: " + ", ".join(names)
    env["packages"] = dict(sorted({d.metadata["Name"].lower(): d.version
                                   for d in importlib.metadata.distributions() if d.metadata["Name"]}.items()))
    return env


def write_environment(path: str | os.PathLike, stage: str) -> None:
    """A stage's environment manifest: see `environment`. No timestamp: the same code on the same machine
    writes the same bytes, so a rerun doesn't change the output's hash. A DVC output (cached), not `cache:
    false`: an uncached output would keep DVC from restoring the stage from its run-cache."""
    atomic_write_json(path, {"stage": stage, **environment()})
