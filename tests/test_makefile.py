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
        "perf",
        "perf-data",
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


def test_train_nproc_and_nnodes_go_through_dvc_on_node_0_and_around_it_elsewhere():
    """NPROC/NNODES are train.nproc/train.nnodes: node 0 records them with `dvc exp run -S`; the other nodes run
    the stage script with the same overrides, and no DVC (it would want outputs only node 0 writes)."""
    assert make("-n", "train").stdout.strip().splitlines()[-1] == "dvc repro train"
    assert make("-n", "train", "NPROC=2").stdout.strip().splitlines()[-1] == "dvc exp run train -S train.nproc=2"
    node0 = make("-n", "train", "NNODES=2", "NODE_RANK=0", "MASTER_ADDR=10.0.0.1").stdout
    assert node0.strip().splitlines()[-1] == "dvc exp run train -S train.nnodes=2"
    node1 = make("-n", "train", "NPROC=8", "NNODES=2", "NODE_RANK=1", "MASTER_ADDR=10.0.0.1").stdout
    assert node1.strip().splitlines()[-1] == "python src/train.py --set train.nproc=8 --set train.nnodes=2"
    assert "dvc" not in node1


def commit(repo: Path, *message: str) -> subprocess.CompletedProcess:
    args = [a for m in message for a in ("-m", m)]
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--allow-empty", "-q", *args],
        cwd=repo,
        capture_output=True,
        text=True,
    )


def test_commit_msg_hook_holds_the_subject_to_72_characters_in_a_real_git_repo(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "config", "core.hooksPath", str(ROOT / ".githooks")], cwd=tmp_path, check=True)
    assert commit(tmp_path, "x" * 72, "A body that says why.").returncode == 0
    assert commit(tmp_path, "短" * 72).returncode == 0  # characters, not bytes
    long = commit(tmp_path, "x" * 73)
    assert long.returncode != 0 and "the subject is 73 characters; keep it to 72" in long.stderr
    glued = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--allow-empty", "-q", "-F", "-"],
        cwd=tmp_path,
        input="Subject\nbody glued to it\n",
        capture_output=True,
        text=True,
    )
    assert glued.returncode != 0 and "leave a blank line between the subject and the body" in glued.stderr
    assert subprocess.run(["git", "log", "--format=%s"], cwd=tmp_path, capture_output=True, text=True).stdout.split(
        "\n"
    )[:2] == ["短" * 72, "x" * 72]
