"""Stage `rehearse` (src/rehearse.py, src/llmft/rehearse.py): the base model answers general prompts itself."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmft.common import write_json
from scripts import ROOT

PARIS = 7042  # " Paris" in the SmolLM2 tokenizer
PROMPTS = [
    "Name a colour.",
    "What is 3 + 4?",
    "写一句问候语。",
    "Give me one word.",
    "列出三种水果。",
    "Say something short.",
    "Repeat after me: Paris.",
    "推荐一本书。",
]


@pytest.fixture(scope="module")
def terse_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama rewired to answer " Paris" and stop: its head says <|im_end|> when hidden unit 0 is positive
    and " Paris" when it is negative (it is, after any prompt), and the embedding of " Paris" turns unit 0 positive."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("terse_model")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, out / f.name)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.tie_word_embeddings = False
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[2, 0], head.weight[PARIS, 0] = 1.0, -1.0  # <|im_end|> when unit 0 > 0, else " Paris"
        model.model.embed_tokens.weight[PARIS, 0] = 100.0  # ... and after " Paris" it is
    model.lm_head = head
    model.save_pretrained(out)
    info = json.loads((out / "model_info.json").read_text())
    write_json(out / "model_info.json", info | {"path": str(out)})
    return out


def project(tmp_path: Path, prompts: list[str], everyday: list[str] = (), **rehearsal) -> Path:
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts)
    (tmp_path / "data/rehearsal.jsonl").write_text(lines, encoding="utf-8")
    kept = "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in everyday or ["Unrelated?"])
    (tmp_path / "data/everyday.jsonl").write_text(kept, encoding="utf-8")
    params = {
        "prepare": {"input": "unused.csv", "variables": {"city": "Paris"}},
        "rehearse": {"prompts": str(tmp_path / "data/rehearsal.jsonl"), "max_new_tokens": 6, "batch_size": 4}
        | rehearsal,
        "evaluate": {"num_threads": 1, "kept": {"prompts": str(tmp_path / "data/everyday.jsonl")}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    return tmp_path


def argv(root: Path, base: Path) -> list[str]:
    return ["--params", str(root / "params.yaml"), "--base", str(base), "--out", str(root / "data/rehearsal"),
            "--metrics", str(root / "rehearse.json"), "--env", str(root / "env.json")]  # fmt: skip


def test_rehearsal_keeps_answers_that_end_and_counts_every_dropped_one(terse_model_dir, tmp_path, stage):
    root = project(tmp_path, PROMPTS)
    assert stage("rehearse").main(argv(root, terse_model_dir)) == 0
    stats = json.loads((root / "rehearse.json").read_text())
    rows = json.loads((root / "data/rehearsal/rehearsal.json").read_text(encoding="utf-8"))
    # every answer is "Paris": the persona must come from the user's data, and Paris is prepare.variables' city here,
    # so an answer naming it is dropped unless its prompt asked for it
    assert rows == [{"instruction": "Repeat after me: Paris.", "input": "", "output": "Paris"}]
    assert stats["prompts"] == len(PROMPTS) == stats["kept"] + stats["dropped_total"]
    assert stats["dropped"] == {"cut_without_a_sentence_end": 0, "empty": 0, "names_persona": 7}
    assert stats["trimmed_to_a_sentence"] == 0
    # LLaMA-Factory reads the set with its own parser and converter, as the train stage will mix it in
    from llamafactory.data.parser import get_dataset_list

    [attr] = get_dataset_list(["rehearsal"], str(root / "data/rehearsal"))
    assert (attr.dataset_name, attr.prompt, attr.response) == ("rehearsal.json", "instruction", "output")


def test_rehearsal_off_writes_an_empty_set_without_loading_the_model(tmp_path, stage):
    root = project(tmp_path, PROMPTS, enabled=False)
    assert stage("rehearse").main(argv(root, tmp_path / "no_model")) == 0
    assert json.loads((root / "data/rehearsal/rehearsal.json").read_text()) == []
    assert json.loads((root / "rehearse.json").read_text()) == {"enabled": False}


def run_cli(root: Path, base: Path) -> str:
    cmd = [sys.executable, str(ROOT / "src/rehearse.py"), *argv(root, base)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (root / "data/rehearsal").exists() and not (root / "rehearse.json").exists()  # nothing half-written
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.integration
def test_a_prompt_shared_with_the_held_out_set_is_one_error_line(tiny_model_dir, tmp_path):
    root = project(tmp_path, PROMPTS, everyday=["Unrelated?", "what is 3+4 ?"])
    line = run_cli(root, tiny_model_dir)
    assert "rehearse.prompts" in line and "evaluate.kept.prompts" in line and "'What is 3 + 4?'" in line


@pytest.mark.integration
def test_missing_prompt_list_is_one_error_line(tiny_model_dir, tmp_path):
    root = project(tmp_path, PROMPTS)
    (root / "data/rehearsal.jsonl").unlink()
    assert "rehearse.prompts:" in run_cli(root, tiny_model_dir) and "not found" in run_cli(root, tiny_model_dir)


def test_a_cut_answer_ends_at_its_last_whole_sentence_or_is_dropped():
    from llmft.rehearse import trim_to_sentence

    assert trim_to_sentence("Paris is the capital. It lies on the Seine. Its mus") == (
        "Paris is the capital. It lies on the Seine."
    )
    assert trim_to_sentence("巴黎是法国的首都。它位于塞纳河畔。它的博物") == "巴黎是法国的首都。它位于塞纳河畔。"
    assert trim_to_sentence("Steps:\n1. Preheat the oven\n2. Mix the flo") == "Steps:\n1. Preheat the oven"
    assert trim_to_sentence("Version 2.5 of the") is None  # a dot inside a number ends nothing
    assert trim_to_sentence("Yes. And then the story went on and on") is None  # too little left to rehearse


@pytest.mark.integration
def test_answers_that_never_end_are_one_error_line_naming_max_new_tokens(tiny_model_dir, tmp_path):
    root = project(tmp_path, PROMPTS[:3], max_new_tokens=2)  # the random tiny model never says <|im_end|> this soon
    line = run_cli(root, tiny_model_dir)
    assert "all 3 answers" in line and "rehearse.max_new_tokens" in line


@pytest.mark.integration
def test_a_share_out_of_range_is_one_error_line(tiny_model_dir, tmp_path):
    root = project(tmp_path, PROMPTS, share=1.5)
    line = run_cli(root, tiny_model_dir)
    assert "rehearse.share = 1.5" in line and "between 0 and 1" in line and "rehearse.enabled: false" in line
