"""The Makefile is the front door: every target is documented, dry-runs cleanly, and defers to DVC."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # starts git, DVC, a server, Jupyter or make

ROOT = Path(__file__).resolve().parent.parent
MAKEFILE = (ROOT / "Makefile").read_text()
DOCUMENTED = re.findall(r"^([a-z-]+):.*## ", MAKEFILE, flags=re.M)


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True)


def test_help_lists_every_target_once_with_a_description():
    out = make("help").stdout
    listed = re.findall(r"^\s+(?:\x1b\[36m)?([a-z-]+)", out, flags=re.M)
    assert sorted(listed) == sorted(set(DOCUMENTED))
    for name in (
        "setup",
        "all",
        "test",
        "data",
        "model",
        "train",
        "eval",
        "export",
        "report",
        "push",
        "pull",
        "chat",
        "serve",
        "notebook",
        "bench",
        "bench-data",
    ):
        assert name in listed, f"make help does not list {name}"


def test_every_target_dry_runs():
    for target in set(DOCUMENTED) - {"help"}:
        proc = make("-n", target)
        assert proc.returncode == 0, f"make -n {target} failed: {proc.stderr}"


def test_pipeline_targets_go_through_dvc_repro():
    assert "dvc repro prepare" in make("-n", "data").stdout
    assert re.search(r"^dvc repro$", make("-n", "all").stdout, flags=re.M)


def test_setup_is_a_noop_when_the_pins_are_unchanged():
    # make test already ran setup, so the stamp for today's pins exists.
    assert "pip install" not in make("-n", "setup").stdout
    assert "pip install" in make("-n", "setup", "PINS=changed").stdout
