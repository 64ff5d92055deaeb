"""The prepare stage through real DVC commands, in a temporary git+DVC copy of this repo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dvc_repo import copy_repo, edit_params, run

pytestmark = pytest.mark.integration  # starts git, DVC, a server, Jupyter or make


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    return copy_repo(tmp_path / "repo")


def test_repro_prepare_writes_versioned_splits_and_status_is_clean(repo: Path):
    out = run(["dvc", "repro", "prepare"], repo).stdout
    assert "Running stage 'prepare'" in out
    train = json.loads((repo / "data/processed/train.json").read_text(encoding="utf-8"))
    val = json.loads((repo / "data/processed/val.json").read_text(encoding="utf-8"))
    assert len(val) == 16 and len(train) == 123  # params.yaml: identity (91) + 24 idiom rows x 2 templates
    text = (repo / "data/processed/train.json").read_text(encoding="utf-8")
    assert "成语" in text and "Lumi" in text and "{{name}}" not in text  # both sources, variables filled
    stats = json.loads((repo / "reports/metrics/prepare.json").read_text())
    assert stats["examples_in"] == stats["kept"] + stats["dropped_total"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["prepare"]["outs"][0]["path"] == "data/processed"
    assert "up to date" in run(["dvc", "status", "prepare"], repo).stdout  # later stages wait for their turn
    assert "prepare" in run(["dvc", "metrics", "show"], repo).stdout

    # Forced rerun: byte-identical data, so its hash in the lock does not move. (The environment manifest
    # may: its git commit now ends in -dirty, since the first run changed the workspace.)
    run(["dvc", "repro", "-f", "prepare"], repo)
    again = yaml.safe_load((repo / "dvc.lock").read_text())
    for key in ("deps", "params"):
        assert again["stages"]["prepare"][key] == lock["stages"]["prepare"][key]
    outs = lambda lk: {o["path"]: o for o in lk["stages"]["prepare"]["outs"]}
    assert outs(again)["data/processed"] == outs(lock)["data/processed"]
    assert set(outs(again)) == {"data/processed", "reports/env/prepare.json", "reports/metrics/prepare.json"}


def test_train_param_edit_leaves_prepare_unchanged_but_a_prepare_edit_does_not(repo: Path):
    run(["dvc", "repro", "prepare"], repo)
    edit_params(repo, "train", learning_rate=1.0e-4)
    assert "prepare" not in run(["dvc", "status", "prepare"], repo).stdout
    edit_params(repo, "prepare", val_size=40)
    status = run(["dvc", "status", "prepare"], repo).stdout
    assert "prepare" in status and "modified:" in status and "prepare" in status.split("modified:")[1]


def test_own_table_tracked_with_dvc_add_feeds_prepare(repo: Path):
    table = repo / "data/raw/mine.csv"
    rows = ["question,answer"] + [f"What is {i} + {i}?,{2 * i}" for i in range(30)]
    table.write_text("\n".join(rows) + "\n", encoding="utf-8")
    run(["dvc", "add", "data/raw/mine.csv"], repo)
    assert (repo / "data/raw/mine.csv.dvc").exists()
    assert "/mine.csv" in (repo / "data/raw/.gitignore").read_text()
    assert run(["git", "check-ignore", "-q", "data/raw/mine.csv"], repo, check=False).returncode == 0  # DVC owns it
    edit_params(repo, "prepare", input="data/raw/mine.csv", sources=[], val_size=5)  # the single-table form
    run(["dvc", "repro", "prepare"], repo)
    train = json.loads((repo / "data/processed/train.json").read_text())
    assert len(train) == 25 and {"instruction", "input", "output"} == set(train[0])
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    raw = next(d for d in lock["stages"]["prepare"]["deps"] if d["path"] == "data/raw")  # the folder of every table
    assert raw["md5"].endswith(".dir") and raw["nfiles"] >= 4  # mine.csv among them
    table.write_text("\n".join(rows[:-1]) + "\n", encoding="utf-8")  # an edit of the table reruns prepare
    assert "prepare" in run(["dvc", "status", "prepare"], repo).stdout
