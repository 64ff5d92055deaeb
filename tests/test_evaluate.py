"""Stage `evaluate` (src/evaluate.py, src/llmft/evaluation.py) on the tiny random Llama with a real LoRA adapter."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eval_data import VAL, write_data, write_params
from llmft import evaluation as evaluate
from scripts import ROOT


def test_evaluate_writes_both_models_answers_and_metrics(tiny_model_dir, adapter_dir, tmp_path, stage):
    data = write_data(tmp_path / "data", VAL, test=VAL[:2])
    metrics_path, predictions_path = tmp_path / "out/eval.json", tmp_path / "out/predictions.jsonl"
    argv = [
        "--params",
        str(write_params(tmp_path / "params.yaml")),
        "--data-dir",
        str(data),
        "--base",
        str(tiny_model_dir),
        "--adapter",
        str(adapter_dir),
        "--metrics",
        str(metrics_path),
        "--predictions",
        str(predictions_path),
    ]
    assert stage("evaluate").main(argv) == 0

    rows = [json.loads(line) for line in predictions_path.read_text(encoding="utf-8").splitlines()]
    assert [(r["split"], r["index"]) for r in rows] == [("val", i) for i in range(5)] + [("test", 0), ("test", 1)]
    assert [r["label"] for r in rows[:5]] == [ex["output"] for ex in VAL]
    assert rows[2]["prompt"] == "Translate to English\n你好，世界"
    assert all(isinstance(r["base"], str) and isinstance(r["tuned"], str) for r in rows)
    assert any(r["base"] != r["tuned"] for r in rows)

    metrics = json.loads(metrics_path.read_text())
    assert metrics["examples"] == {"val": 5, "test": 2}
    for name in ("base", "tuned", "delta"):
        assert set(metrics[name]) == {"val", "test"}
        assert {"bleu4", "rouge1", "rouge2", "rougeL", "exact_match", "loss", "perplexity"} <= set(metrics[name]["val"])
        assert set(metrics[name]["val"]["llamafactory"]) == {"bleu-4", "rouge-1", "rouge-2", "rouge-l"}
    base, tuned = metrics["base"]["val"], metrics["tuned"]["val"]
    assert metrics["delta"]["val"]["loss"] == pytest.approx(tuned["loss"] - base["loss"])
    assert base["loss"] != tuned["loss"] and base["perplexity"] > 1
    assert "jieba" in metrics["method"]


def run_cli(tmp_path: Path, base: Path, adapter: Path, data: Path, **eval_params) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    params = write_params(tmp_path / "p.yaml", **eval_params)
    cmd = [
        sys.executable,
        str(ROOT / "src/evaluate.py"),
        "--params",
        str(params),
        "--data-dir",
        str(data),
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--metrics",
        str(out / "eval.json"),
        "--predictions",
        str(out / "predictions.jsonl"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not out.exists() or not any(out.iterdir())
    return result


@pytest.mark.integration
@pytest.mark.parametrize(
    "val, message",
    [
        ("[]", "non-empty JSON list"),
        ("{oops", "not valid UTF-8 JSON"),
        (
            '[{"instruction": "hi", "input": "", "output": "ok"}, {"instruction": "no answer"}]',
            "example 2 is not a valid",
        ),
    ],
)
def test_bad_or_empty_val_split_is_one_error_line(tiny_model_dir, adapter_dir, tmp_path, val, message):
    result = run_cli(tmp_path, tiny_model_dir, adapter_dir, write_data(tmp_path / "data", val))
    assert message in result.stderr.splitlines()[-1]


@pytest.mark.integration
def test_missing_adapter_is_one_error_line(tiny_model_dir, tmp_path):
    result = run_cli(tmp_path, tiny_model_dir, tmp_path / "no_lora", write_data(tmp_path / "data", VAL))
    assert "no LoRA adapter" in result.stderr and "dvc repro train" in result.stderr


@pytest.mark.integration
def test_tokenizer_without_chat_template_is_one_error_line(tiny_model_dir, adapter_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    info = json.loads((base / "model_info.json").read_text())
    (base / "model_info.json").write_text(json.dumps(info | {"path": str(base)}))  # the copy, not the original
    result = run_cli(tmp_path, base, adapter_dir, write_data(tmp_path / "data", VAL))
    assert "has no chat template" in result.stderr


@pytest.mark.integration
def test_vllm_backend_without_vllm_is_one_error_line(tiny_model_dir, adapter_dir, tmp_path):
    if importlib.util.find_spec("vllm"):
        pytest.skip("vllm is installed here")
    result = run_cli(tmp_path, tiny_model_dir, adapter_dir, write_data(tmp_path / "data", VAL), backend="vllm")
    assert "vllm is not installed" in result.stderr


def test_sharegpt_split_is_read_as_llamafactory_reads_it(fmt, tmp_path):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "冰寒于水？"},
        {"role": "assistant", "content": "冰比水冷。"},
    ]
    (tmp_path / "val.json").write_text(json.dumps([{"conversations": conversation}], ensure_ascii=False))
    tags = {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "system_tag": "system",
    }
    info = {
        "val": {
            "file_name": "val.json",
            "formatting": "sharegpt",
            "columns": {"messages": "conversations"},
            "tags": tags,
        }
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    [example] = evaluate.encode_split(tmp_path, "val", evaluate.load_rows(tmp_path, "val", None), fmt)
    assert (example["prompt"], example["label"]) == ("冰寒于水？", "冰比水冷。")
    text = fmt.tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True, tokenize=False)
    assert fmt.tokenizer.decode(example["prompt_ids"]) == text
