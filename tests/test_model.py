"""Stage `model` (src/model.py): embedded GGUF conversion, local dirs, Hub ids, template choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmft.common import UserError
from llmft.model import CHECK_PROMPT, SAMPLE_CHAT, render_chat, resolve_template
from scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = {"source", "path", "template", "num_parameters", "eos_token", "pad_token", "sha256"}


def write_params(tmp_path: Path, **model) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"prepare": {"input": "unused.csv"}, "model": model}), encoding="utf-8")
    return path


def run_stage(tmp_path: Path, **model) -> tuple[Path, dict]:
    out = tmp_path / "models" / "base"
    argv = ["--params", str(write_params(tmp_path, **model)), "--out", str(out), "--env", str(tmp_path / "env.json")]
    assert load_script("src/model.py").main(argv) == 0  # --env: not the repo's reports/env/model.json
    return out, json.loads((out / "model_info.json").read_text(encoding="utf-8"))


def greedy(model_dir: Path, prompt: str, max_new_tokens: int = 48) -> tuple[list[int], str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    return new, tok.decode(new, skip_special_tokens=True)


# --- the embedded SmolLM2 (slow: dequantizes 135M parameters once for the module) ---


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> tuple[Path, dict]:
    return run_stage(tmp_path_factory.mktemp("embedded"))


@pytest.mark.slow
def test_embedded_writes_safetensors_and_the_contract(embedded):
    out, info = embedded
    assert (out / "model.safetensors").is_file()
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= {
        f.name for f in out.iterdir()
    }
    assert CONTRACT <= info.keys()
    assert info["source"] == "embedded:SmolLM2-135M-Instruct.Q4_1.gguf"
    assert info["path"] == str(out)
    assert info["template"] == "smollm2"
    assert 130e6 < info["num_parameters"] < 140e6
    assert len(info["sha256"]) == 64
    assert info["eos_token"] == info["pad_token"] == "<|im_end|>"


@pytest.mark.slow
def test_embedded_eos_and_pad_are_im_end_everywhere(embedded):
    out, _ = embedded
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == tok_cfg["pad_token"] == "<|im_end|>"
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((out / name).read_text())
        assert (cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 2), name


@pytest.mark.slow
def test_embedded_answers_paris_and_stops_at_im_end(embedded):
    out, info = embedded
    new, answer = greedy(out, CHECK_PROMPT)
    assert new[-1] == 2 and len(new) < 48
    assert "Paris" in answer
    assert info["check"]["answer"] == answer.strip()


# --- a local directory ---


def test_local_dir_without_copy_writes_only_a_pointer(tmp_path, tiny_model_dir):
    out, info = run_stage(tmp_path, name_or_path=str(tiny_model_dir), template="smollm2")
    assert [f.name for f in out.iterdir()] == ["model_info.json"]
    assert CONTRACT <= info.keys()
    assert info["source"] == info["path"] == str(tiny_model_dir.resolve())
    assert info["num_parameters"] == json.loads((tiny_model_dir / "model_info.json").read_text())["num_parameters"]
    assert (info["template"], info["eos_token"], info["sha256"], info["weights_written"]) == (
        "smollm2",
        "<|im_end|>",
        None,
        False,
    )


def test_local_dir_with_copy_weights_is_loadable_from_models_base(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    out, info = run_stage(tmp_path, name_or_path=str(tiny_model_dir), copy_weights=True)
    assert info["path"] == str(out) and info["weights_written"] is True
    copy, orig = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (out, tiny_model_dir))
    assert copy.keys() == orig.keys()
    for name in orig:
        torch.testing.assert_close(copy[name], orig[name], rtol=0, atol=0, msg=name)
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


def test_local_dir_without_weights_is_a_clear_error(tmp_path, smol_tokenizer_dir):
    with pytest.raises(UserError, match=r"no weights \(\*\.safetensors or \*\.bin\)"):
        run_stage(tmp_path, name_or_path=str(smol_tokenizer_dir))
    assert not (tmp_path / "models" / "base").exists()


def test_missing_local_path_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        run_stage(tmp_path, name_or_path="./models/hub/nothing-here")


# --- a Hub id with no Hub in reach ---


@pytest.mark.integration
def test_unreachable_hub_id_fails_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "models" / "base"
    params = write_params(tmp_path, name_or_path="HuggingFaceTB/SmolLM2-360M-Instruct")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # empty cache: nothing to fall back on
    proc = subprocess.run(
        [sys.executable, "src/model.py", "--params", str(params), "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "cannot reach the Hugging Face Hub" in errors[0]
    assert "hf download HuggingFaceTB/SmolLM2-360M-Instruct --local-dir models/hub/SmolLM2-360M-Instruct" in errors[0]
    assert not out.exists() and not list(out.parent.glob("*"))  # no half-written models/base or .base.*.tmp


# --- templates ---


@pytest.mark.parametrize(
    "name, model_type, has_chat_template, expected",
    [
        ("embedded", "llama", True, "smollm2"),
        ("HuggingFaceTB/SmolLM2-360M-Instruct", "llama", True, "smollm2"),
        ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2", True, "qwen"),
        ("Meta-Llama-3.1-8B-Instruct", "llama", True, "llama3"),
        ("my-finetune", "gemma2", True, "gemma2"),
        ("Qwen/Qwen2.5-0.5B", "qwen2", False, "alpaca"),  # no chat template of its own: the original guide's alpaca
        ("some-org/unknown-model", "llama", True, "alpaca"),
    ],
)
def test_auto_template_follows_the_model(name, model_type, has_chat_template, expected):
    assert resolve_template("auto", name, model_type, has_chat_template) == expected


def test_explicit_template_is_kept_whatever_the_model():
    assert resolve_template("llama3", "embedded", "llama", True) == "llama3"


def test_unknown_template_lists_valid_names():
    with pytest.raises(UserError, match=r"model.template='smollm3' is not a LLaMA-Factory template.*smollm2"):
        resolve_template("smollm3", "embedded", "llama", True)


def test_smollm2_template_renders_like_the_tokenizers_own_with_a_system_prompt(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    assert render_chat("smollm2", tok, SAMPLE_CHAT) == tok.apply_chat_template(SAMPLE_CHAT, tokenize=False)
