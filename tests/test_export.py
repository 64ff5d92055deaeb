"""Stage export: the merge is checked against base+adapter, a broken merge writes nothing, the output is plain."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmft import export
from llmft.common import run_main
from scripts import load_script

PROMPT = "Hello! Who are you?"


def run_export(tmp: Path, base: Path, adapter: Path, **export_params) -> tuple[int, Path]:
    params = {
        "prepare": {"input": "unused.csv"},
        "export": {"check_prompts": [PROMPT], "check_new_tokens": 8, **export_params},
    }
    (tmp / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    (data / "train.json").write_text('[{"instruction": "hi", "output": "hello"}]\n', encoding="utf-8")
    argv = [
        "--params",
        str(tmp / "params.yaml"),
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--out",
        str(tmp / "merged"),
        "--data-dir",
        str(data),
        "--eval",
        str(tmp / "eval.json"),
        "--metrics",
        str(tmp / "export.json"),
        "--env",
        str(tmp / "env.json"),  # not the repo's reports/env/export.json, a DVC output
    ]
    return run_main(load_script("src/export.py").main, argv), tmp / "merged"


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tiny_lora_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    (tmp / "eval.json").write_text(json.dumps({"base": {"exact_match": 0.1}, "tuned": {"exact_match": 0.6}}))
    rc, out = run_export(tmp, tiny_model_dir, tiny_lora_dir, max_shard_size="100KB")
    assert rc == 0
    return out, json.loads((tmp / "export.json").read_text())


def logits_and_greedy(model, tokenizer, prompt: str):
    import torch

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        return model(ids).logits, seq


def test_merge_check_passes_on_a_real_adapter(exported):
    _, metrics = exported
    for check in ("merge_check", "reload_check"):
        assert metrics[check]["max_abs_diff"] <= 1e-4
        assert metrics[check]["greedy_match"] is True
    assert metrics["dtype"] == "float32" and metrics["qlora_bits"] is None


def test_merged_loads_with_plain_transformers_and_equals_base_plus_adapter(exported, tiny_model_dir, tiny_lora_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = exported
    assert not list(out.glob("*.py")) and "auto_map" not in json.loads((out / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    merged = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, tiny_lora_dir).eval()
    bare = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt = "A prompt the export check never saw."  # not one of check_prompts
    got, want, before = (logits_and_greedy(m, tokenizer, prompt) for m in (merged, unmerged, bare))
    assert (got[0] - want[0]).abs().max().item() <= 1e-4
    assert torch.equal(got[1], want[1])
    assert (got[0] - before[0]).abs().max().item() > 1e-2  # the adapter does change the model
    assert merged.generation_config.eos_token_id == [2]  # <|im_end|>: plain generate() stops at the end of a turn


def test_shards_honour_max_shard_size(exported):
    out, metrics = exported
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and metrics["num_shards"] == len(shards)
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    from safetensors import safe_open

    for shard in shards:  # a shard over the limit may only be one tensor that alone exceeds it
        with safe_open(shard, "pt") as f:
            assert shard.stat().st_size <= 100_000 + 10_000 or len(list(f.keys())) == 1


def test_model_card_names_base_data_params_and_eval(exported):
    out, _ = exported
    card = (out / "README.md").read_text()
    info = json.loads((out / "model_info.json").read_text())
    assert "tiny-random-llama" in card and "smollm2" in card
    assert info["data_md5"] and f"DVC hash `{info['data_md5']}`" in card
    assert "lora_rank: 8" in card and "learning_rate:" in card
    assert '"exact_match": 0.6' in card
    assert "Merge check:" in card and info["template"] == "smollm2"


def _drop_adapter(model):  # the adapter is forgotten: merged == base
    return model.unload()


def _perturb_one_layer(model):  # the merged weights are off in one layer
    merged = model.merge_and_unload()
    merged.model.layers[0].mlp.down_proj.weight.data.add_(1e-2)
    return merged


@pytest.mark.parametrize("corrupt", [_drop_adapter, _perturb_one_layer])
def test_broken_merge_fails_and_writes_nothing(
    corrupt,
    tiny_model_dir,
    tiny_lora_dir,
    tmp_path,
    monkeypatch,
    capsys,
):
    monkeypatch.setattr(export, "merge", corrupt)
    rc, out = run_export(tmp_path, tiny_model_dir, tiny_lora_dir)
    err = capsys.readouterr().err
    assert rc == 2
    assert "error: merge check failed: max |Δ logits|" in err and "nothing was written" in err
    assert not out.exists() and not (tmp_path / "export.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temporary left either


def test_quantized_base_checkpoint_is_refused(tiny_model_dir, tiny_lora_dir, tmp_path, capsys):
    base = shutil.copytree(tiny_model_dir, tmp_path / "base4bit")
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    info = json.loads((base / "model_info.json").read_text())
    (base / "model_info.json").write_text(json.dumps({**info, "path": str(base)}))  # the copy's own weights
    rc, out = run_export(tmp_path, base, tiny_lora_dir)
    err = capsys.readouterr().err
    assert rc == 2 and "quantized (bitsandbytes)" in err and "full-precision" in err
    assert not out.exists()


def test_qlora_adapter_is_merged_into_the_full_precision_base(tiny_model_dir, tiny_lora_dir, tmp_path):
    adapter = shutil.copytree(tiny_lora_dir, tmp_path / "qlora")
    (adapter / "train_config.yaml").write_text("quantization_bit: 4\nfinetuning_type: lora\n")
    rc, out = run_export(tmp_path, tiny_model_dir, adapter)
    metrics = json.loads((tmp_path / "export.json").read_text())
    assert rc == 0 and metrics["qlora_bits"] == 4 and metrics["merge_check"]["max_abs_diff"] <= 1e-4
    assert "QLoRA on a 4-bit base" in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.integration
def test_data_hash_is_the_one_dvc_records(tmp_path):
    data = tmp_path / "processed"
    (data / "sub").mkdir(parents=True)
    (data / "train.json").write_text('[{"instruction": "成语", "output": "答案"}]\n', encoding="utf-8")
    (data / "sub" / "val.json").write_bytes(b"[]\r\n")
    dvc = [str(Path(sys.executable).with_name("dvc"))]
    subprocess.run(dvc + ["init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run(dvc + ["add", "-q", "processed"], cwd=tmp_path, check=True)
    recorded = yaml.safe_load((tmp_path / "processed.dvc").read_text())["outs"][0]["md5"]
    assert recorded == export.dvc_dir_md5(data) + ".dir"


def test_bf16_export_halves_the_files_and_reports_its_rounding(tiny_model_dir, tiny_lora_dir, tmp_path):
    rc, out = run_export(tmp_path, tiny_model_dir, tiny_lora_dir, dtype="bf16")
    metrics = json.loads((tmp_path / "export.json").read_text())
    assert rc == 0 and metrics["dtype"] == "bfloat16" and metrics["merge_check"]["max_abs_diff"] <= 1e-4
    assert 1e-4 < metrics["reload_check"]["max_abs_diff"] < 0.1  # bf16 rounding, reported but not fatal
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
