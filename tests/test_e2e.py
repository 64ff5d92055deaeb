"""The whole pipeline, `make all`, on the real embedded SmolLM2-135M, shrunk through params overrides.

This is the smoke run CI does so that the main job can never break unnoticed: every stage runs
for real (GGUF conversion, LLaMA-Factory training, evaluation, merge), only on a few examples
and a few optimizer steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from dvc_repo import copy_repo, edit_params, run

pytestmark = pytest.mark.integration  # starts git, DVC, a server, Jupyter or make


@pytest.mark.slow
def test_make_all_runs_every_stage_on_the_embedded_model_then_nothing(tmp_path: Path):
    repo = copy_repo(tmp_path / "repo")
    # a user's own larger table of long Chinese answers beside the demo's: the CPU budget cuts the run (not refuses
    # it), the rehearsal pool is too small for the share, and evaluate answers a capped part of the val split
    run([sys.executable, "perf/make_long_table.py", "--rows", "300", "--out", "data/raw/idioms_long.csv"], repo)
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    long_table = {"path": "data/raw/idioms_long.csv", "columns": {"instruction": "问题", "output": "回答"}}
    edit_params(repo, "prepare", val_size=70, sources=[*params["prepare"]["sources"], long_table])
    edit_params(
        repo,
        "train",
        cpu_token_budget=1500,
        cutoff_len=128,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        logging_steps=1,
        save_steps=2,
        eval_steps=2,
    )
    edit_params(repo, "evaluate", max_new_tokens=16)  # max_examples auto: 64 of the 70 val examples on a CPU
    edit_params(repo, "rehearse", num_examples=12, max_new_tokens=48)
    edit_params(repo, "benchmark", limit=12)
    edit_params(repo, "gguf", types=["q8_0"], check_new_tokens=4)  # one file: the conversion and its checks, halved
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "smoke-sized params, a long table"], repo)

    done = run(["make", "--no-print-directory", "all"], repo, timeout=3000)
    out = done.stdout + done.stderr  # the stages' log lines: DVC passes their stderr through
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for stage in stages:
        assert f"Running stage '{stage}'" in out, f"stage {stage} did not run"

    info = json.loads((repo / "models/base/model_info.json").read_text())
    assert info["template"] == "smollm2" and info["eos_token"] == "<|im_end|>"
    assert (repo / "models/lora/adapter_model.safetensors").exists()
    train = json.loads((repo / "reports/metrics/train.json").read_text())
    plan = train["cpu_plan"]  # cut at the budget, not refused; the plan line said how many examples it sees
    assert 0 < train["global_step"] == plan["max_steps"] < plan["steps"] and plan["own_seen"] < plan["own_examples"]
    assert f"sees ~{plan['own_seen']} of your {plan['own_examples']} examples once" in out
    assert "whole CPU run ~" in out
    evaluation = json.loads((repo / "reports/metrics/eval.json").read_text())
    assert set(evaluation) >= {"base", "tuned", "delta"}
    predictions = [json.loads(line) for line in (repo / "reports/predictions.jsonl").read_text().splitlines()]
    val = [p for p in predictions if p["split"] == "val"]
    n_val = json.loads((repo / "reports/metrics/prepare.json").read_text())["splits"]["val"]  # 70 asked
    assert len(val) == 64 and all(p["tuned"] is not None for p in predictions)
    assert n_val > 64 and evaluation["examples"] == {"val": 64} and evaluation["examples_available"] == {"val": n_val}
    probes = [p for p in predictions if p["split"] == "probe"]  # params.yaml's probes, answered by both models
    assert len(probes) == len(yaml.safe_load((repo / "params.yaml").read_text())["evaluate"]["probes"])
    assert set(evaluation) >= {"probes", "changed", "verdict"} and evaluation["probes"]["tuned"]["total"] == 5
    # what it kept: the held-out everyday prompts, answered by both, and the rehearsal mixed into training
    kept = evaluation["kept"]
    assert kept["counts"]["prompts"] == len([p for p in predictions if p["split"] == "kept"]) >= 60
    assert kept["counts"]["drift_tokens"] > 0 and isinstance(kept["drift"], float)
    assert {"leak", "facts_right", "facts_kept", "language"} <= set(kept["tuned"])
    rehearse = json.loads((repo / "reports/metrics/rehearse.json").read_text())
    assert rehearse["prompts"] == 12 == rehearse["kept"] + rehearse["dropped_total"] and rehearse["kept"] > 0
    share = yaml.safe_load((repo / "params.yaml").read_text())["rehearse"]["share"]
    mix = train["rehearsal"]  # a few answers for hundreds of examples: drawn twice at most, the share comes down
    own = json.loads((repo / "reports/metrics/prepare.json").read_text())["splits"]["train"]
    assert mix["train_examples"] == own and mix["available"] == rehearse["kept"] and mix["max_repeats"] == 2
    assert mix["examples"] == 2 * rehearse["kept"] < mix["asked"] == round(share / (1 - share) * own)
    assert f"rehearsal share down from {share:.0%} to {mix['share']:.0%}" in out
    report = (repo / "reports/report.md").read_text()
    assert f"cut training at step {plan['max_steps']} of {plan['steps']}" in report
    assert f"Evaluated on the first 64 of {n_val} val examples" in report
    assert "dataset: train,rehearsal" in (repo / "models/lora/train_config.yaml").read_text()
    bench = json.loads((repo / "reports/metrics/benchmark.json").read_text())["tasks"]["hellaswag_subset"]
    assert (
        bench["n"] == 12
        and bench["chance"] == 0.25
        and bench["delta"]["acc"] == pytest.approx(bench["tuned"]["acc"] - bench["base"]["acc"])
    )
    samples = (repo / "reports/benchmark/samples.jsonl").read_text().splitlines()
    assert len(samples) == 12 and "Benchmark accuracy" in (repo / "reports/report.md").read_text()
    export = json.loads((repo / "reports/metrics/export.json").read_text())
    assert export["reload_check"]["max_abs_diff"] <= 1e-4 and export["reload_check"]["greedy_match"]
    gguf = json.loads((repo / "reports/metrics/gguf.json").read_text())
    assert gguf["files"]["q8_0"]["max_abs_diff"] <= gguf["files"]["q8_0"]["atol"]
    assert (repo / "models/gguf/Modelfile").read_text().startswith("# Ollama")

    # Nothing changed: DVC reruns nothing, and the status is clean.
    again = run(["make", "--no-print-directory", "all"], repo, timeout=600).stdout
    assert "Running stage" not in again
    assert "up to date" in run(["dvc", "status"], repo).stdout
