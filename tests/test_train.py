"""Stage `train` (src/train.py, src/lf_config.py, src/lf_run.py).

Fast tests check the pure parts: config, validation, precision, launch environment, memory estimate, the OOM
back-off (with a fake launcher: no GPU exists here) and what counts as a complete checkpoint. Slow tests run the
real `llamafactory-cli train` on the tiny random Llama from conftest.py, on CPU, a few steps each.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import lf_config
import lf_run
from common import UserError
from params import TrainParams

ROOT = Path(__file__).resolve().parent.parent
TRAIN = {"max_steps": 6, "max_samples": 16, "cutoff_len": 64, "per_device_train_batch_size": 2,
         "gradient_accumulation_steps": 2, "learning_rate": 1.0e-3, "logging_steps": 1, "save_steps": 2,
         "eval_steps": 2}
ROWS = [{"instruction": f"解释成语「成语{i}」的意思。", "input": "", "output": f"第{i}个成语：比喻做事认真。"}
        for i in range(24)]


def config(**train) -> dict:
    return lf_config.build_config(TrainParams(**train), model_path="models/base", template="smollm2",
                                  trust_remote_code=False, data_dir="data/processed", output_dir="checkpoints",
                                  precision="fp32")


# ---------- fast: pure functions ----------

def test_precision_auto_is_bf16_then_fp16_then_fp32():
    assert lf_config.choose_precision("auto", cuda_available=True, bf16_supported=True) == "bf16"
    assert lf_config.choose_precision("auto", cuda_available=True, bf16_supported=False) == "fp16"  # a Colab T4
    assert lf_config.choose_precision("auto", cuda_available=False, bf16_supported=False) == "fp32"
    assert lf_config.choose_precision("fp32", cuda_available=True, bf16_supported=True) == "fp32"


def test_forced_precision_the_device_lacks_says_what_to_use():
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        lf_config.choose_precision("fp16", cuda_available=False, bf16_supported=False)
    with pytest.raises(UserError, match="no bf16 support.*use fp16"):
        lf_config.choose_precision("bf16", cuda_available=True, bf16_supported=False)


def test_config_is_llamafactory_house_style_yaml():
    sections = config(use_dora=True, quantization_bit=4, extra={"gradient_checkpointing": True})
    text = lf_config.to_yaml(sections, ["llamafactory-cli train models/lora/train_config.yaml"])
    assert text.startswith("# llamafactory-cli train models/lora/train_config.yaml\n")
    assert [line for line in text.splitlines() if line.startswith("###")] == [
        "### model", "### method", "### dataset", "### output", "### train", "### eval", "### extra"]
    cfg = yaml.safe_load(text)
    assert cfg == lf_config.flat(sections)
    assert cfg["use_dora"] is True and cfg["quantization_bit"] == 4 and cfg["gradient_checkpointing"] is True
    assert cfg["report_to"] == "dvclive" and cfg["overwrite_output_dir"] is False and cfg["eval_dataset"] == "val"
    assert "bf16" not in cfg and "fp16" not in cfg  # fp32


def test_extra_keys_that_break_the_stage_or_duplicate_a_typed_key_are_rejected():
    known = set(lf_config.flat(config())) | {"neftune_noise_alpha"}
    lf_config.validate(config(extra={"neftune_noise_alpha": 5}), {"neftune_noise_alpha": 5}, known=known)
    with pytest.raises(UserError, match="train.extra.overwrite_output_dir: set by the train stage"):
        lf_config.validate(config(), {"overwrite_output_dir": True}, known=known)
    with pytest.raises(UserError, match="use train.lora_rank instead"):
        lf_config.validate(config(), {"lora_rank": 4}, known=known, typed={"lora_rank"})
    with pytest.raises(UserError, match="train.extra.neftune_alpha: not a LLaMA-Factory .*'neftune_noise_alpha'"):
        lf_config.validate(config(extra={"neftune_alpha": 5}), {"neftune_alpha": 5}, known=known)


def test_launch_is_plain_llamafactory_cli_on_one_gpu():
    cmd, env = lf_config.launch_command("/run/cfg.yaml", {"PATH": "/usr/bin"}, deepspeed=None, bin_dir="/venv/bin")
    assert cmd == ["/venv/bin/llamafactory-cli", "train", "/run/cfg.yaml"]
    assert "FORCE_TORCHRUN" not in env and env["PATH"] == f"/venv/bin{os.pathsep}/usr/bin"


def test_deepspeed_and_multinode_launches_force_torchrun_and_keep_the_rendezvous_env():
    _, env = lf_config.launch_command("c.yaml", {"PATH": "/usr/bin"}, deepspeed="z3", bin_dir="/venv/bin")
    assert env["FORCE_TORCHRUN"] == "1"
    nodes = {"PATH": "/usr/bin", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    _, env = lf_config.launch_command("c.yaml", nodes, deepspeed=None, bin_dir="/venv/bin")
    assert env["FORCE_TORCHRUN"] == "1" and {k: env[k] for k in nodes if k != "PATH"} == {
        "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    for z in ("z2", "z3"):
        ds = json.loads((ROOT / lf_config.DEEPSPEED_CONFIGS[z]).read_text())
        assert ds["zero_optimization"]["stage"] == int(z[1]) and ds["train_micro_batch_size_per_gpu"] == "auto"


def test_memory_estimate_follows_its_documented_formula():
    cfg = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 1000, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 128, "dtype": "float32"}
    est = lf_config.estimate_peak_gib(cfg, 4_000_000, finetuning_type="lora", lora_rank=8, quantization_bit=None,
                                      precision="fp32", batch=4, seq=32)
    gib = 2**30
    assert est["weights"] == pytest.approx(1_000_000 * 4 / gib)
    assert est["optimizer"] == pytest.approx(16 * 8 * 2 * (9 * 64 + 2 * 32 + 3 * 128) / gib)
    assert est["activations"] == pytest.approx(4 * 32 * 64 * 4 * (2 + 17) / gib)
    assert est["logits"] == pytest.approx(8 * 4 * 32 * 1000 / gib)
    assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"))
    qlora = lf_config.estimate_peak_gib(cfg, 4_000_000, finetuning_type="lora", lora_rank=8, quantization_bit=4,
                                        precision="bf16", batch=4, seq=32)
    assert qlora["weights"] == pytest.approx(est["weights"] / 8)


def fake_launcher(oom_above: int, calls: list):
    """Stands in for llamafactory-cli: OOMs like CUDA does while the per-device batch is above `oom_above`."""
    def launch(sections):
        batch = sections["train"]["per_device_train_batch_size"]
        calls.append((batch, sections["train"]["gradient_accumulation_steps"]))
        if batch > oom_above:
            return 1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
        return 0, ""
    return launch


def test_cuda_oom_halves_batch_and_doubles_accumulation_until_it_fits():
    """A GPU can't exist here, so a fake launcher plays the OOMing child."""
    calls: list = []
    start = config(per_device_train_batch_size=8, gradient_accumulation_steps=2)
    sections, retries, rc = lf_run.train_with_backoff(start, fake_launcher(2, calls), enabled=True)
    assert rc == 0 and retries == 2 and calls == [(8, 2), (4, 4), (2, 8)]
    assert sections["train"]["per_device_train_batch_size"] * sections["train"]["gradient_accumulation_steps"] == 16
    assert lf_run.backoff(6, 1) == (3, 2) and lf_run.backoff(3, 2) == (1, 6) and lf_run.backoff(1, 4) is None


def test_oom_at_batch_one_or_with_backoff_off_names_the_knobs():
    for train, enabled in (({"per_device_train_batch_size": 2}, True), ({}, False)):
        with pytest.raises(UserError, match="CUDA out of memory.*cutoff_len.*QLoRA.*gradient checkpointing.*deepspeed"):
            lf_run.train_with_backoff(config(**train), fake_launcher(0, []), enabled=enabled)


def test_a_crash_that_is_not_an_oom_is_not_retried():
    calls: list = []
    _, retries, rc = lf_run.train_with_backoff(config(), lambda s: (calls.append(1), (3, "KeyError: 'x'"))[1], True)
    assert (rc, retries, calls) == (3, 0, [1])


def fake_checkpoint(path: Path, step: int) -> Path:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, path / "adapter_model.safetensors")
    torch.save({"state": {}}, path / "optimizer.pt")
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_a_checkpoint_torn_mid_save_is_skipped_and_removed(tmp_path):
    good = fake_checkpoint(tmp_path / "checkpoint-2", 2)
    no_state = fake_checkpoint(tmp_path / "checkpoint-4", 4)
    (no_state / "trainer_state.json").unlink()  # killed before transformers wrote it (it goes last)
    cut = fake_checkpoint(tmp_path / "checkpoint-6", 6)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # killed while the weights were being written
    bad_optimizer = fake_checkpoint(tmp_path / "checkpoint-8", 8)
    (bad_optimizer / "optimizer.pt").write_bytes((bad_optimizer / "optimizer.pt").read_bytes()[:100])
    assert lf_run.checkpoint_problem(good) is None
    assert all(lf_run.checkpoint_problem(c) for c in (no_state, cut, bad_optimizer))
    assert lf_run.newest_complete(tmp_path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_fingerprint_ignores_output_path_and_batch_split_but_not_params_or_data(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("[]")
    (tmp_path / "model_info.json").write_text("{}")
    fp = lambda sections: lf_run.fingerprint(tmp_path / "data", tmp_path, sections)  # noqa: E731
    base = fp(config())
    moved = config()
    moved["output"]["output_dir"] = "elsewhere"
    assert fp(moved) == base == fp(config(per_device_train_batch_size=2, gradient_accumulation_steps=8))
    assert fp(config(learning_rate=1e-4)) != base
    (tmp_path / "data" / "train.json").write_text("[{}]")
    assert fp(config()) != base


# ---------- slow: the real llamafactory-cli on a tiny model ----------

def make_project(root: Path, **train) -> Path:
    data = root / "data" / "processed"
    data.mkdir(parents=True)
    (data / "train.json").write_text(json.dumps(ROWS[:18], ensure_ascii=False), encoding="utf-8")
    (data / "val.json").write_text(json.dumps(ROWS[18:], ensure_ascii=False), encoding="utf-8")
    cols = {"prompt": "instruction", "query": "input", "response": "output"}
    (data / "dataset_info.json").write_text(json.dumps({n: {"file_name": f"{n}.json", "columns": cols}
                                                        for n in ("train", "val")}))
    set_train(root, **train)
    return root


def set_train(root: Path, **train) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump({"data": {"input": "unused.csv"}, "train": TRAIN | train}))


def stage_cmd(model_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "src" / "train.py"), "--model-dir", str(model_dir)]


def run_stage(root: Path, model_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(stage_cmd(model_dir), cwd=root, capture_output=True, text=True, timeout=600, check=False)


def no_weights(tmp_path: Path) -> Path:
    """A models/base with model_info.json only: these runs must stop before they would load anything."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model_info.json").write_text(json.dumps({"path": "nowhere", "template": "smollm2"}))
    return tmp_path / "base"


def adapter(root: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(root / "models" / "lora" / "adapter_model.safetensors")


def assert_same_adapter(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for k, tensor in a.items():
        assert torch.allclose(tensor, b[k], rtol=1e-5), k


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
    steps = lambda name: [int(r.split("\t")[0]) for r in (plots / name).read_text().splitlines()[1:]]  # noqa: E731
    assert steps("loss.tsv") == steps("learning_rate.tsv") == [1, 2, 3, 4, 5, 6]
    assert steps("eval/loss.tsv") == [2, 4, 6]
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
    chat = ChatModel({"model_name_or_path": str(tiny_model_dir), "template": "smollm2",
                      "adapter_name_or_path": str(trained / "models" / "lora"), "finetuning_type": "lora",
                      "max_new_tokens": 3, "do_sample": False})
    responses = chat.chat([{"role": "user", "content": "解释成语「成语1」的意思。"}])
    assert len(responses) == 1 and isinstance(responses[0].response_text, str)


@pytest.mark.slow
def test_saved_config_reruns_with_plain_llamafactory_cli(trained, tmp_path):
    """Plain LLaMA-Factory resumes from checkpoints in output_dir by itself, so the rerun gets a fresh one."""
    cli = Path(sys.executable).parent / "llamafactory-cli"
    proc = subprocess.run([str(cli), "train", "models/lora/train_config.yaml", f"output_dir={tmp_path}/rerun"],
                          cwd=trained, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    assert_same_adapter(load_file(tmp_path / "rerun" / "adapter_model.safetensors"), adapter(trained))


@pytest.mark.slow
def test_rerun_after_kill_9_resumes_from_newest_complete_checkpoint_and_matches(trained, tiny_model_dir, tmp_path):
    root = make_project(tmp_path)
    proc = subprocess.Popen(stage_cmd(tiny_model_dir), cwd=root, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = root / "checkpoints" / "checkpoint-2"
    deadline = time.time() + 300
    while not (first.exists() and lf_run.checkpoint_problem(first) is None):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.1)
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
        trained / "reports" / "metrics" / "train.json").read_text()
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
def test_every_generated_key_is_a_llamafactory_argument():
    known = lf_config.lf_fields()
    for train in ({}, {"finetuning_type": "full"}, {"quantization_bit": 4, "use_dora": True, "use_rslora": True}):
        lf_config.validate(config(**train), {}, known=known)
    sections = config()
    sections["method"]["deepspeed"] = "configs/deepspeed/ds_z3.json"
    lf_config.validate(sections, {}, known=known)


@pytest.mark.slow
def test_unknown_extra_key_fails_before_the_model_loads(tmp_path):
    root = make_project(tmp_path, extra={"lora_rnak": 4})
    proc = run_stage(root, no_weights(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("error: train.extra.lora_rnak: not a LLaMA-Factory training "
                                                    "argument; did you mean 'lora_rank'?")
    assert not (root / "checkpoints" / "fingerprint.json").exists()


def test_qlora_on_a_cpu_is_a_clear_error_before_anything_loads(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_stage(make_project(tmp_path, quantization_bit=4), no_weights(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: train.quantization_bit=4 (QLoRA, bitsandbytes) "
                                                           "needs a CUDA GPU")
