"""Remotes, experiments and reproducibility through real git + DVC commands, on the tiny model.

One baseline repo runs the whole pipeline once, is committed (dvc.lock and the small outputs kept in git)
and pushed to the default local remote; each test works in its own fresh clone of it, pulled from there.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from dvc_repo import BIN, ROOT, copy_repo, edit_params, run
from llmft.tools import compare

pytestmark = pytest.mark.integration  # starts git, DVC, a server, Jupyter or make

ADAPTER = "models/lora/adapter_model.safetensors"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model_dir) -> Path:
    repo = copy_repo(tmp_path_factory.mktemp("exp") / "repo")
    edit_params(repo, "model", name_or_path=str(tiny_model_dir))
    edit_params(repo, "prepare", val_size=4)
    edit_params(
        repo,
        "train",
        max_steps=2,
        max_samples=8,
        cutoff_len=64,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        logging_steps=1,
        save_steps=1,
        eval_steps=1,
        learning_rate=1.0e-3,
    )
    edit_params(repo, "evaluate", max_examples=4, max_new_tokens=8, num_threads=1)
    edit_params(repo, "rehearse", enabled=False)  # a random tiny model's answers never end: nothing to rehearse
    edit_params(repo, "benchmark", limit=8)
    edit_params(repo, "gguf", types=["q8_0"], check_new_tokens=4)
    out = run(["dvc", "repro"], repo, timeout=1800).stdout
    assert "Running stage 'report'" in out
    run(["git", "add", "-A"], repo)  # dvc.lock and the outputs kept in git (metrics, curves, manifests, report)
    run(["git", "commit", "-qm", "baseline"], repo)
    run(["dvc", "push"], repo)  # the default remote: ../llm-finetune-dvc-storage, beside the repo
    return repo


def clone(baseline: Path, name: str) -> Path:
    repo = baseline.parent / name
    run(["git", "clone", "-q", str(baseline), str(repo)], baseline.parent)
    if not (repo / ".venv").exists():
        (repo / ".venv").symlink_to(ROOT / ".venv")
    run(["dvc", "pull"], repo)
    return repo


@pytest.mark.slow
def test_fresh_clone_and_pull_is_clean_runs_nothing_and_retrains_the_same_adapter(baseline):
    repo = clone(baseline, "clone")
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo).stdout
    assert "Running stage" not in run(["dvc", "repro"], repo).stdout
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert {o["path"] for o in lock["stages"]["train"]["outs"]} >= {"models/lora", "checkpoints"}  # both versioned
    assert any((repo / "checkpoints").glob("checkpoint-*/adapter_model.safetensors"))  # came back with the pull
    for stage in ("prepare", "model", "train", "evaluate", "export"):
        env = json.loads((repo / f"reports/env/{stage}.json").read_text())
        assert env["stage"] == stage and env["python"].startswith("3.11") and env["git_commit"] != "unknown"
        assert env["packages"]["dvc"] and env["packages"]["llamafactory"] == "0.9.5"
    assert json.loads((repo / "reports/env/train.json").read_text())["torch"]["version"].startswith("2.11")
    assert json.loads((repo / "reports/env/train.json").read_text())["device"].startswith("cpu: ")

    # Same data, params and seed on the same CPU: training from scratch gives a bit-identical adapter.
    expected = sha256(repo / ADAPTER)
    run(["rm", "-rf", "checkpoints"], repo)
    out = run(["dvc", "repro", "train"], repo, timeout=900)
    assert "Running stage 'train'" in out.stdout and "nothing to train" not in out.stderr
    assert sha256(repo / ADAPTER) == expected


@pytest.mark.slow
def test_exp_run_with_a_changed_param_never_resumes_the_baselines_checkpoints(baseline):
    repo = clone(baseline, "exp-run")
    assert (repo / "checkpoints/run_metrics.json").exists()  # the baseline's finished run, persisted
    proc = run(["dvc", "exp", "run", "-n", "rank4", "-S", "train.lora_rank=4"], repo, timeout=1800)
    log = proc.stdout + proc.stderr
    assert "Running stage 'train'" in log and "starting fresh" in log and "nothing to train" not in log
    train = json.loads((repo / "reports/metrics/train.json").read_text())
    assert train["resumed_from_step"] == 0 and train["global_step"] == 2
    config = yaml.safe_load((repo / "models/lora/adapter_config.json").read_text())
    assert config["r"] == 4

    rows = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    exps = {e["name"]: e for row in rows for e in (row.get("experiments") or []) for e in e["revs"] if e.get("name")}
    data = exps["rank4"]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["lora_rank"] == 4
    assert "eval_loss" in data["metrics"]["reports/metrics/train.json"]["data"]


@pytest.mark.slow
def test_make_sweep_runs_the_grid_from_the_queue_and_compare_reports_the_difference(baseline):
    repo = clone(baseline, "sweep")
    out = run(["make", "--no-print-directory", "sweep", "SWEEP=-S train.lora_rank=4,8"], repo, timeout=2400).stdout
    names = re.search(r"queued 2 experiments: (\S+), (\S+)", out).groups()
    assert "2 success" in out and "lora_rank" in out and "eval_loss" in out
    ranks = {}
    for name in names:
        text = run(
            [
                str(BIN / "python"),
                "-c",
                f"import dvc.api; print(dvc.api.params_show(rev={name!r})['train']['lora_rank'])",
            ],
            repo,
        ).stdout
        ranks[name] = int(text)
    assert sorted(ranks.values()) == [4, 8]
    a, b = sorted(names, key=ranks.get)

    out = run(["make", "--no-print-directory", "compare", f"A={a}", f"B={b}"], repo).stdout
    params = out.split("== params")[1].split("== metrics")[0]
    assert "train.lora_rank" in params and "4" in params and "8" in params
    assert "eval_loss" in out.split("== metrics")[1].split("== benchmarks")[0]
    bench = out.split("== benchmarks")[1].split("== answers")[0]  # both ran the HellaSwag subset (limit 8)
    assert "tasks.hellaswag_subset" in bench or "no benchmark metric changed" in bench
    assert re.search(r"4 examples in both, 0 only in", out)  # the val answers of both, read through DVC
    bad = run(["make", "--no-print-directory", "compare", "A=no-such-exp", f"B={b}"], repo, check=False)
    assert bad.returncode != 0 and "no-such-exp" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_a_second_repro_while_one_runs_gets_a_lock_error_and_changes_nothing(baseline):
    repo = clone(baseline, "lock")
    run(["rm", "-rf", "checkpoints"], repo)  # so that train really trains, for a while
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "DVC_NO_ANALYTICS": "1"}
    first = subprocess.Popen(
        [str(BIN / "dvc"), "repro", "train"],
        cwd=repo,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 300
    while not (repo / "checkpoints/fingerprint.json").exists():  # written by train.py, inside the first repro
        assert first.poll() is None and time.time() < deadline, "the first repro ended before training started"
        time.sleep(0.2)
    before = {f: (repo / f).read_bytes() for f in ("dvc.lock", "params.yaml")}
    second = run(["dvc", "repro"], repo, check=False)
    assert first.poll() is None, "the first repro must still be running, or this tests nothing"
    # DVC holds the repo lock while it collects stages, then read/write locks on each stage's paths while it
    # runs: the second one meets either, and its message says which process holds it.
    assert second.returncode != 0, second.stdout
    assert "Unable to acquire lock" in second.stderr or (
        "is busy, it is being blocked by" in second.stderr and "dvc repro train" in second.stderr
    ), second.stderr
    assert "Running stage" not in second.stdout
    assert {f: (repo / f).read_bytes() for f in before} == before
    out, _ = first.communicate(timeout=900)
    assert first.returncode == 0, out
    assert "train" not in run(["dvc", "status", "train"], repo).stdout  # the first finished intact
    from safetensors.torch import load_file

    assert load_file(repo / ADAPTER)


def test_compare_ranks_the_examples_whose_answer_lost_most():
    key = lambda prompt, label: ("val", prompt, label)
    a = {
        key("p1", "画蛇添足"): {"tuned": "画蛇添足"},
        key("p2", "the cat sat"): {"tuned": "the cat sat"},
        key("p3", "x y"): {"tuned": "z"},
        key("only-a", "q"): {"tuned": "q"},
    }
    b = {
        key("p1", "画蛇添足"): {"tuned": "他画蛇添足了"},
        key("p2", "the cat sat"): {"tuned": "a dog"},
        key("p3", "x y"): {"tuned": "x y"},
    }
    worst, matched = compare.dropped(a, b, top=5)
    assert matched == 3
    assert [r["prompt"] for r in worst] == ["p2", "p1"]  # 100 -> 0, then 100 -> 50 (jieba: 他/画蛇添足/了)
    assert worst[0]["score_a"] == 100.0 and worst[0]["score_b"] == 0.0  # p3 improved: not listed
    assert worst[1]["score_b"] == 50.0 and worst[1]["b"] == "他画蛇添足了"
