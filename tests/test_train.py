"""Stage `train` (src/train.py, src/llmft/train.py): the real `llamafactory-cli train` on the tiny random Llama
from conftest.py, on CPU, a few steps each; resume after kill -9; errors before anything loads.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from train_project import (
    adapter,
    assert_same_adapter,
    make_project,
    make_rehearsal,
    no_weights,
    run_stage,
    set_train,
    stage_cmd,
    start_stage,
    wait_for_checkpoint,
)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> Path:
    """One uninterrupted 6-step run of the stage: the reference the other slow tests compare with."""
    root = make_project(tmp_path_factory.mktemp("trained"))
    proc = run_stage(root, tiny_model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.slow
def test_stage_trains_logs_live_metrics_and_writes_the_adapter(trained):
    metrics = json.loads((trained / "reports" / "metrics" / "train.json").read_text())
    assert metrics["global_step"] == 6 and metrics["resumed_from_step"] == 0 and metrics["oom_retries"] == 0
    assert metrics["train_loss"] > 0 and metrics["eval_loss"] > 0 and metrics["tokens_per_sec"] > 0
    assert (metrics["per_device_train_batch_size"], metrics["gradient_accumulation_steps"]) == (2, 2)
    plots = trained / "dvclive" / "train" / "plots" / "metrics"
    steps = lambda name: [int(r.split("\t")[0]) for r in (plots / name).read_text().splitlines()[1:]]
    assert steps("loss.tsv") == steps("learning_rate.tsv") == [1, 2, 3, 4, 5, 6]
    assert steps("eval/loss.tsv") == [2, 4, 6]
    # only the curves: nothing machine-specific (DVCLive's params.yaml has temporary paths) to show up in git status
    assert [p.name for p in (trained / "dvclive" / "train").iterdir()] == ["plots"]
    out = trained / "models" / "lora"
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_config.yaml", "training_loss.png"):
        assert (out / name).exists(), name
    assert not list(trained.glob("dvc.yaml")), "dvclive must not write a dvc.yaml where the stage runs"


@pytest.mark.slow
def test_adapter_loads_with_plain_peft_and_llamafactory_chat(trained, tiny_model_dir):
    from llamafactory.chat import ChatModel
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), trained / "models" / "lora")
    assert any("lora_A" in name for name, _ in model.named_parameters())
    chat = ChatModel(
        {
            "model_name_or_path": str(tiny_model_dir),
            "template": "smollm2",
            "adapter_name_or_path": str(trained / "models" / "lora"),
            "finetuning_type": "lora",
            "max_new_tokens": 3,
            "do_sample": False,
        }
    )
    responses = chat.chat([{"role": "user", "content": "解释成语「成语1」的意思。"}])
    assert len(responses) == 1 and isinstance(responses[0].response_text, str)


@pytest.mark.slow
def test_saved_config_reruns_with_plain_llamafactory_cli(trained, tiny_model_dir, tmp_path):
    """Plain LLaMA-Factory resumes from checkpoints in output_dir by itself, so the rerun gets a fresh one.

    On a CPU with a bf16 unit the stage loaded the base in bf16 (a dtype view): the record names the base as
    stored, so a plain rerun runs under bf16 autocast, within bf16 rounding of the stage's adapter; pointed at such
    a view, as the record's header says, it reruns exactly."""
    from safetensors.torch import load_file

    from llmft.train import dtype_view

    def rerun(name: str, *overrides: str) -> dict:
        cli = Path(sys.executable).parent / "llamafactory-cli"
        cmd = [str(cli), "train", "models/lora/train_config.yaml", f"output_dir={tmp_path}/{name}", *overrides]
        proc = subprocess.run(cmd, cwd=trained, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return load_file(tmp_path / name / "adapter_model.safetensors")

    metrics = json.loads((trained / "reports" / "metrics" / "train.json").read_text())
    if metrics["base_dtype"] == "as stored":  # fp32, or a GPU: the record alone reruns it exactly
        return assert_same_adapter(rerun("rerun"), adapter(trained))
    header = (trained / "models/lora/train_config.yaml").read_text().split("###")[0]
    assert "loaded" in header and "bfloat16" in header and "dtype_view" in header
    view = dtype_view(tiny_model_dir, tmp_path / "view", metrics["base_dtype"])
    assert_same_adapter(rerun("exact", f"model_name_or_path={view}"), adapter(trained))
    plain, ours = rerun("rerun"), adapter(trained)
    # Autocast keeps the norms and embeddings in fp32, so the plain rerun is a rounding apart: each tensor points
    # the same way (an independent init of lora_A would give a cosine near 0). Its length can differ by a few
    # percent (6% on one CI machine), since Adam's early steps are all about lr in size and rounding flips a few.
    for key, tensor in plain.items():
        cosine = torch.nn.functional.cosine_similarity(tensor.flatten(), ours[key].flatten(), dim=0)
        assert cosine >= 0.98, (key, float(cosine))


@pytest.mark.slow
def test_rerun_after_kill_9_resumes_from_newest_complete_checkpoint_and_matches(trained, tiny_model_dir, tmp_path):
    root = make_project(tmp_path)
    proc = start_stage(root, tiny_model_dir)
    wait_for_checkpoint(proc, root)
    os.killpg(proc.pid, signal.SIGKILL)  # the stage and its llamafactory-cli child, like a closed terminal
    proc.wait()
    assert not (root / "models" / "lora").exists(), "training finished before the kill; the test proves nothing"
    newest = max(root.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    torn = shutil.copytree(newest, root / "checkpoints" / "checkpoint-5")  # and one killed while saving its weights
    (torn / "adapter_model.safetensors").write_bytes((torn / "adapter_model.safetensors").read_bytes()[:1000])
    log_lines = len((root / "checkpoints" / "trainer_log.jsonl").read_text().splitlines())

    rerun = run_stage(root, tiny_model_dir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "skipping incomplete" in rerun.stderr and "checkpoint-5" in rerun.stderr
    step = json.loads((root / "reports" / "metrics" / "train.json").read_text())["resumed_from_step"]
    assert step in (2, 4) and f"resuming from checkpoints/checkpoint-{step} (step {step})" in rerun.stderr
    new_log = (root / "checkpoints" / "trainer_log.jsonl").read_text().splitlines()[log_lines:]
    assert json.loads(new_log[0])["current_steps"] == step + 1  # global_step continues after the checkpoint
    assert_same_adapter(adapter(root), adapter(trained))


@pytest.mark.slow
def test_rerun_of_a_finished_run_trains_nothing_and_keeps_its_metrics(trained, tiny_model_dir, tmp_path):
    root = shutil.copytree(trained, tmp_path / "project")
    shutil.rmtree(root / "models" / "lora")
    (root / "reports" / "metrics" / "train.json").unlink()  # as `dvc repro -f` does with outputs
    proc = run_stage(root, tiny_model_dir)
    assert proc.returncode == 0 and "holds a finished run of these inputs: nothing to train" in proc.stderr
    assert (root / "reports" / "metrics" / "train.json").read_text() == (
        trained / "reports" / "metrics" / "train.json"
    ).read_text()
    assert_same_adapter(adapter(root), adapter(trained))


@pytest.mark.slow
def test_a_params_change_starts_fresh(trained, tiny_model_dir, tmp_path):
    root = shutil.copytree(trained, tmp_path / "project")
    set_train(root, learning_rate=5.0e-4, max_steps=2)
    proc = run_stage(root, tiny_model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "changed since checkpoints was written: starting fresh (removing 2 checkpoints)" in proc.stderr
    metrics = json.loads((root / "reports" / "metrics" / "train.json").read_text())
    assert metrics["resumed_from_step"] == 0 and metrics["global_step"] == 2
    assert sorted(p.name for p in root.glob("checkpoints/checkpoint-*")) == ["checkpoint-2"]


@pytest.mark.slow
def test_unknown_extra_key_fails_before_the_model_loads(tmp_path):
    root = make_project(tmp_path, extra={"lora_rnak": 4})
    proc = run_stage(root, no_weights(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: train.extra.lora_rnak: not a LLaMA-Factory training argument; did you mean 'lora_rank'?"
    )
    assert not (root / "checkpoints" / "fingerprint.json").exists()


@pytest.mark.integration
def test_qlora_on_a_cpu_is_a_clear_error_before_anything_loads(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_stage(make_project(tmp_path, quantization_bit=4), no_weights(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: train.quantization_bit=4 (QLoRA, bitsandbytes) needs a CUDA GPU")
    )


@pytest.mark.slow
def test_a_cpu_run_says_its_cost_first_and_stops_at_the_token_budget(tiny_model_dir, tmp_path):
    # 16 examples x 6 steps planned; a 300-token budget stops the run after a few steps, and the log says so first
    root = make_project(tmp_path, max_steps=None, num_train_epochs=3, cpu_token_budget=300, eval_steps=50)
    proc = run_stage(root, tiny_model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPU run: 12 optimizer steps of 4 examples" in proc.stderr
    assert "over train.cpu_token_budget=300: training stops at step" in proc.stderr
    metrics = json.loads((root / "reports" / "metrics" / "train.json").read_text())
    plan = metrics["cpu_plan"]
    assert plan["steps"] == 12 and plan["tokens"] > 300 and metrics["global_step"] == plan["max_steps"] < 12


@pytest.mark.slow
def test_rehearsal_is_mixed_in_by_llamafactory_and_a_budget_cut_keeps_it(tiny_model_dir, tmp_path):
    root = make_project(tmp_path)
    make_rehearsal(root, 10)
    # 16 own examples (max_samples) ask for 16 rehearsal ones; 10 answers drawn at most twice give them. 32 examples
    # of ~30 tokens an epoch, 2 epochs = 16 steps of 4: the budget cuts the run inside the first epoch
    set_train(root, rehearsal={"share": 0.5}, max_steps=None, num_train_epochs=2.0, cpu_token_budget=400)
    env = os.environ | {"LLAMAFACTORY_VERBOSITY": "INFO"}  # LLaMA-Factory's own log line below is INFO
    proc = subprocess.run(stage_cmd(tiny_model_dir), cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "16 of the base model's own answers (10 available, none drawn more than twice an epoch)" in proc.stderr
    out = proc.stdout + proc.stderr
    assert "Sampled 10 examples from dataset" in out and "Sampled 6 examples from dataset" in out  # LF's own draw
    metrics = json.loads((root / "reports/metrics/train.json").read_text())
    assert metrics["rehearsal"] == {
        "examples": 16,
        "train_examples": 16,
        "share": 0.5,
        "asked": 16,
        "available": 10,
        "max_repeats": 2,
    }
    plan = metrics["cpu_plan"]
    assert plan["steps"] == 16 and 0 < plan["max_steps"] == metrics["global_step"] < 8  # cut, not refused
    assert plan["own_seen"] == round(plan["max_steps"] * 4 / 32 * 16) and plan["own_examples"] == 16
    assert f"sees ~{plan['own_seen']} of your 16 examples once (with rehearsal in the same share)" in proc.stderr
    assert "whole CPU run ~" in proc.stderr and " train " in proc.stderr.split("whole CPU run ~")[1]
    config = (root / "models/lora/train_config.yaml").read_text()
    assert "\ndataset: train,rehearsal,rehearsal_2\n" in config and "\nmix_strategy: concat\n" in config
    assert "\ndataset_dir: models/lora\n" in config
    # the record reruns from the repo root: LLaMA-Factory's own parser finds both sets through models/lora
    from llamafactory.data.parser import get_dataset_list

    attrs = get_dataset_list(["train", "rehearsal", "rehearsal_2"], str(root / "models/lora"))
    assert [(root / "models/lora" / a.dataset_name).resolve() for a in attrs] == [
        (root / "data/processed/train.json").resolve(),
        (root / "data/rehearsal/rehearsal.json").resolve(),
        (root / "data/rehearsal/rehearsal.json").resolve(),
    ]
    assert [a.num_samples for a in attrs[1:]] == [10, 6]


@pytest.mark.slow
def test_a_cpu_run_draws_its_in_training_eval_from_a_long_val_split(tiny_model_dir, tmp_path):
    # 6 val examples, evaluate.max_examples 2: each in-training eval reads 2 of them, drawn by LLaMA-Factory itself
    root = make_project(tmp_path, cpu_token_budget=100_000, eval_steps=2)
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(params | {"evaluate": {"max_examples": 2}}))
    env = os.environ | {"LLAMAFACTORY_VERBOSITY": "INFO"}  # LLaMA-Factory's own log line below is INFO
    proc = subprocess.run(stage_cmd(tiny_model_dir), cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in-training eval loss on a CPU: 2 of the 6 val examples (drawn with the seed)" in proc.stderr
    assert "Sampled 2 examples from dataset" in proc.stdout + proc.stderr
    metrics = json.loads((root / "reports/metrics/train.json").read_text())
    assert metrics["cpu_plan"]["eval"]["examples"] == 2 and metrics["cpu_plan"]["eval"]["available"] == 6
    # the record reruns from the repo root with the same draw: LLaMA-Factory's parser reads it through models/lora
    assert "\ndataset_dir: models/lora\n" in (root / "models/lora/train_config.yaml").read_text()
    from llamafactory.data.parser import get_dataset_list

    (val,) = get_dataset_list(["val"], str(root / "models/lora"))
    assert val.num_samples == 2
    assert (root / "models/lora" / val.dataset_name).resolve() == (root / "data/processed/val.json").resolve()


@pytest.mark.integration
def test_rehearsal_on_without_its_data_is_one_error_line(tmp_path):
    root = make_project(tmp_path, max_steps=None)
    set_train(root, rehearsal={"share": 0.3}, max_steps=None)
    proc = run_stage(root, no_weights(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: data/rehearsal/dataset_info.json not found though rehearse.enabled is true: "
        "run `dvc repro rehearse` first"
    )
