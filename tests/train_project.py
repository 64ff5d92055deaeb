"""A tiny train-stage project (params.yaml + data/processed) and how to run the real stage on it.

root = make_project(tmp_path, max_steps=3)     # params: TRAIN | overrides
proc = run_stage(root, tiny_model_dir)         # python src/train.py in a fresh interpreter
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from scripts import ROOT

TRAIN = {
    "max_steps": 6,
    "max_samples": 16,
    "cutoff_len": 64,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "learning_rate": 1.0e-3,
    "logging_steps": 1,
    "save_steps": 2,
    "eval_steps": 2,
}


ROWS = [
    {"instruction": f"解释成语「成语{i}」的意思。", "input": "", "output": f"第{i}个成语：比喻做事认真。"}
    for i in range(24)
]


def make_project(root: Path, **train) -> Path:
    data = root / "data" / "processed"
    data.mkdir(parents=True)
    (data / "train.json").write_text(json.dumps(ROWS[:18], ensure_ascii=False), encoding="utf-8")
    (data / "val.json").write_text(json.dumps(ROWS[18:], ensure_ascii=False), encoding="utf-8")
    cols = {"prompt": "instruction", "query": "input", "response": "output"}
    (data / "dataset_info.json").write_text(
        json.dumps({n: {"file_name": f"{n}.json", "columns": cols} for n in ("train", "val")})
    )
    set_train(root, **train)
    return root


def set_train(root: Path, rehearsal: dict | None = None, **train) -> None:
    """params.yaml: TRAIN | train; rehearsal off unless given (make_rehearsal writes the set it mixes in)."""
    params = {"prepare": {"input": "unused.csv"}, "rehearse": rehearsal or {"enabled": False}, "train": TRAIN | train}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def make_rehearsal(root: Path, count: int) -> Path:
    """data/rehearsal as the rehearse stage writes it: `count` general prompts with short answers."""
    from llmft.rehearse import write_rehearsal

    rows = [{"instruction": f"What is {i} + {i}?", "input": "", "output": f"{2 * i}."} for i in range(count)]
    write_rehearsal(rows, {"enabled": True}, root / "data" / "rehearsal", root / "rehearse.json")
    return root / "data" / "rehearsal"


def stage_cmd(model_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "src" / "train.py"), "--base", str(model_dir)]


def start_stage(root: Path, model_dir: Path, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """The stage in a session of its own (os.killpg ends it and its llamafactory-cli child), not waited for."""
    return subprocess.Popen(
        stage_cmd(model_dir), cwd=root, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr, text=True
    )


def wait_for_checkpoint(proc: subprocess.Popen, root: Path, timeout: float = 300) -> None:
    """Until checkpoints/ holds a complete checkpoint (any: save_total_limit removes the older ones fast)."""
    from llmft.lf.run import checkpoint_problem

    deadline = time.time() + timeout
    while not any(checkpoint_problem(c) is None for c in root.glob("checkpoints/checkpoint-*")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)


def run_stage(root: Path, model_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        stage_cmd(model_dir), cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False
    )


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
