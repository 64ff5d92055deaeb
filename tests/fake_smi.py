"""A fake `nvidia-smi` for tests: prints what a given driver and GPUs would, or fails the ways real ones do."""

from __future__ import annotations

from pathlib import Path

import pytest


def fake_smi(
    tmp_path: Path, stdout: str = "", exit_code: int = 0, stderr: str = "", old: bool = False, sleep: float = 0
) -> Path:
    """A directory holding an `nvidia-smi` that prints `stdout` and exits `exit_code`; `old` = rejects compute_cap."""
    bindir = tmp_path / "fake-smi-bin"
    bindir.mkdir(exist_ok=True)
    reject = 'case "$*" in *compute_cap*) echo \'Field "compute_cap" is not a valid field to query.\'; exit 2;; esac\n'
    (bindir / "out").write_text(stdout)
    (bindir / "err").write_text(stderr)
    body = f"sleep {sleep}\ncat '{bindir}/out'\ncat '{bindir}/err' >&2\nexit {exit_code}\n"
    (bindir / "nvidia-smi").write_text(f"#!/bin/sh\n{reject if old else ''}{body}")
    (bindir / "nvidia-smi").chmod(0o755)
    return bindir


def gpus(driver: str, *caps: str, name: str = "NVIDIA A100-SXM4-80GB") -> str:
    """nvidia-smi --query-gpu=driver_version,name,compute_cap --format=csv,noheader for one GPU per capability."""
    return "".join(f"{driver}, {name}, {cc}\n" for cc in caps)


@pytest.fixture(name="smi")
def smi_fixture(tmp_path, monkeypatch):
    """smi(stdout, ...) puts a fake nvidia-smi first on PATH; smi(None) leaves none on PATH at all."""

    def make(*args, **kwargs):
        if args and args[0] is None:
            monkeypatch.setenv("PATH", "/nonexistent")
        else:
            monkeypatch.setenv("PATH", f"{fake_smi(tmp_path, *args, **kwargs)}:/usr/bin:/bin")

    return make
