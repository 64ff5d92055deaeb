"""Stage `evaluate` (src/evaluate.py, src/llmft/evaluate.py) on the tiny random Llama with a real LoRA adapter."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eval_data import VAL, write_data, write_params
from llmft import evaluate
from scripts import ROOT


def eval_argv(params: Path, data: Path, base: Path, adapter: Path, metrics: Path, predictions: Path) -> list[str]:
    """The evaluate stage's arguments, as dvc.yaml passes them."""
    return [
        "--params",
        str(params),
        "--data-dir",
        str(data),
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--metrics",
        str(metrics),
        "--predictions",
        str(predictions),
        "--pairs",
        str(data / "no-pairs"),
        "--sft",
        str(adapter),
        "--env",
        str(metrics.parent / "env.json"),  # not the repo's reports/env/evaluate.json
    ]  # no prefer stage here: no pairs


def test_evaluate_writes_both_models_answers_and_metrics(tiny_model_dir, adapter_dir, tmp_path, stage):
    data = write_data(tmp_path / "data", VAL, test=VAL[:2])
    metrics_path, predictions_path = tmp_path / "out/eval.json", tmp_path / "out/predictions.jsonl"
    params = write_params(tmp_path / "params.yaml")
    argv = eval_argv(params, data, tiny_model_dir, adapter_dir, metrics_path, predictions_path)
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
    # beside each split's loss, its paired interval over the same examples: its means are the token-weighted losses
    for split, n in (("val", 5), ("test", 2)):
        loss = metrics["paired"][split]["loss"]
        assert loss["n"] == n and loss["low"] <= loss["diff"] <= loss["high"]
        assert loss["base"] == pytest.approx(metrics["base"][split]["loss"], abs=1e-5)
        assert loss["diff"] == pytest.approx(metrics["delta"][split]["loss"], abs=1e-5)
    assert all(r["base_loss"] > 0 and r["tuned_loss"] > 0 for r in rows)  # per example, for make compare


def run_cli(tmp_path: Path, base: Path, adapter: Path, data: Path, **eval_params) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    params = write_params(tmp_path / "p.yaml", **eval_params)
    argv = eval_argv(params, data, base, adapter, out / "eval.json", out / "predictions.jsonl")
    cmd = [sys.executable, str(ROOT / "src/evaluate.py"), *argv]
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
    [example] = evaluate.encode_split(tmp_path, "val", evaluate.load_rows(tmp_path, "val", None)[0], fmt)
    assert (example["prompt"], example["label"]) == ("冰寒于水？", "冰比水冷。")
    text = fmt.tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True, tokenize=False)
    assert fmt.tokenizer.decode(example["prompt_ids"]) == text


def test_probes_are_answered_by_both_models_and_scored(tiny_model_dir, adapter_dir, tmp_path, stage):
    data = write_data(tmp_path / "data", VAL)
    probes = [
        {"prompt": "你是谁？", "expect": ["{{name}}"]},
        {"prompt": "Who are you?", "expect": "{{name}}"},
        {"prompt": "Tell me a joke."},  # shown, not scored
    ]
    params = write_params(tmp_path / "params.yaml", variables={"name": "Lumi"}, probes=probes)
    out = tmp_path / "out"
    argv = eval_argv(params, data, tiny_model_dir, adapter_dir, out / "eval.json", out / "p.jsonl")
    assert stage("evaluate").main(argv) == 0
    metrics = json.loads((out / "eval.json").read_text())
    rows = [json.loads(line) for line in (out / "p.jsonl").read_text(encoding="utf-8").splitlines()]
    probe_rows = [r for r in rows if r["split"] == "probe"]
    assert [r["prompt"] for r in probe_rows] == ["你是谁？", "Who are you?", "Tell me a joke."]
    assert probe_rows[0]["expect"] == ["Lumi"] and probe_rows[2]["expect"] == [] and probe_rows[2]["tuned_pass"] is None
    assert all(isinstance(r["base"], str) and isinstance(r["tuned"], str) for r in probe_rows)
    assert metrics["probes"]["tuned"]["total"] == 2  # the random tiny model never says Lumi: 0 of 2
    assert metrics["probes"]["tuned"]["passed"] == sum(bool(r["tuned_pass"]) for r in probe_rows) == 0
    assert metrics["examples"] == {"val": 5}  # probes are not val examples: the val metrics don't see them
    assert 0 <= metrics["changed"]["val"] <= 100
    verdict_keys = {"moved", "same_answers_pct", "loss_drop_pct", "warning", "kept", "forgot", "noise"}
    assert set(metrics["verdict"]) == verdict_keys
    assert metrics["probes"]["paired"]["n"] == 2 and metrics["probes"]["paired"]["diff"] == 0.0
    assert "kept" not in metrics and metrics["verdict"]["kept"] is None  # evaluate.kept.prompts: null


def test_everyday_prompts_measure_what_the_tuned_model_kept(tiny_model_dir, adapter_dir, tmp_path, stage):
    everyday = [
        {"prompt": "Which city is the capital of Japan?", "expect": ["Tokyo"], "kind": "fact"},
        {"prompt": "写一首关于大海的两行诗。", "kind": "writing"},
        {"prompt": "Translate 你好 into English.", "kind": "translation"},
    ]
    kept_file = tmp_path / "everyday.jsonl"
    kept_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in everyday), encoding="utf-8")
    params = write_params(tmp_path / "params.yaml", variables={"name": "Lumi"}, kept={"prompts": str(kept_file)})
    out = tmp_path / "out"
    argv = eval_argv(params, write_data(tmp_path / "data", VAL), tiny_model_dir, adapter_dir, out / "e.json", out / "p")
    assert stage("evaluate").main(argv) == 0
    metrics = json.loads((out / "e.json").read_text())
    rows = [r for r in map(json.loads, (out / "p").read_text(encoding="utf-8").splitlines()) if r["split"] == "kept"]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in everyday]
    assert rows[0]["expect"] == ["Tokyo"] and rows[0]["kind"] == "fact" and rows[2]["tuned_lang"] is None
    for row in rows:
        assert isinstance(row["base"], str) and isinstance(row["tuned"], str) and row["tuned_leak"] == []
    kept = metrics["kept"]
    assert kept["counts"] == {"prompts": 3, "facts": 1, "base_facts_right": 0, "facts_kept": 0, "facts_gained": 0,
                              "language_scored": 2,
                              "drift_tokens": kept["counts"]["drift_tokens"]}  # fmt: skip
    assert kept["counts"]["drift_tokens"] > 0 and kept["base"]["leak"] == kept["tuned"]["leak"] == 0.0
    assert kept["tuned"]["facts_kept"] is None  # the random base got no fact right: nothing to keep
    # drift: the base's own answers cost more under the adapter than under the base itself (it changes outputs)
    base_nll, tuned_nll = kept["base"]["base_answers_nll"], kept["tuned"]["base_answers_nll"]
    assert kept["drift"] == pytest.approx(tuned_nll - base_nll) and kept["drift"] != 0
    drift = kept["paired"]["drift"]
    assert drift["n"] == 3 and drift["diff"] == pytest.approx(kept["drift"], abs=1e-5)
    assert kept["paired"]["leak"]["n"] == 3 and kept["paired"]["language"]["n"] == 2
    assert 0 <= metrics["changed"]["kept"] <= 100 and metrics["verdict"]["kept"] is True
    assert metrics["examples"] == {"val": 5}  # the everyday prompts are not val examples


def test_probe_pass_is_case_insensitive_any_of_and_filled_from_variables():
    assert evaluate.passes("I am LUMI, an assistant.", ["lumi"]) is True
    assert evaluate.passes("我是小明", ["Lumi", "小明"]) is True
    assert evaluate.passes("I am SmolLM", ["Lumi"]) is False and evaluate.passes("anything", []) is None
    assert evaluate.fill("我是 {{name}}，由 {{author}} 开发", {"name": "Lumi"}) == "我是 Lumi，由 {{author}} 开发"
    rows = [
        {"expect": ["Lumi"], "base_pass": False, "tuned_pass": True},
        {"expect": ["Lumi"], "base_pass": False, "tuned_pass": False},
        {"expect": [], "base_pass": None, "tuned_pass": None},
    ]
    scores = evaluate.probe_scores(rows)
    assert scores["base"] == {"passed": 0, "total": 2, "pass_rate": 0.0}
    assert scores["tuned"] == {"passed": 1, "total": 2, "pass_rate": 50.0}
    assert scores["paired"]["n"] == 2 and scores["paired"]["diff"] == 50.0 and not scores["paired"]["beyond_noise"]


def test_verdict_warns_only_when_answers_stayed_and_the_loss_hardly_fell():
    from llmft.params import EvaluateParams

    def metrics(base_loss, tuned_loss, changed):
        return {
            "base": {"val": {"loss": base_loss}},
            "tuned": {"val": {"loss": tuned_loss}},
            "changed": {"val": changed},
        }

    stalled = evaluate.verdict(metrics(3.637, 3.60, 10.0), EvaluateParams())
    assert not stalled["moved"] and stalled["same_answers_pct"] == 90 and stalled["loss_drop_pct"] == 1.02
    for knob in (
        "train.learning_rate",
        "train.num_train_epochs",
        "train.max_steps",
        "train.max_samples",
        "per_device_train_batch_size x gradient_accumulation_steps",
    ):
        assert knob in stalled["warning"]
    assert evaluate.verdict(metrics(2.37, 0.74, 10.0), EvaluateParams())["warning"] is None  # the loss moved
    assert evaluate.verdict(metrics(3.6, 3.6, 60.0), EvaluateParams())["moved"]  # the answers moved


def test_stalled_fires_only_when_the_loss_interval_rules_out_a_real_drop():
    from llmft.params import EvaluateParams

    def metrics(low: float, n: int) -> dict:
        interval = {"n": n, "base": 3.637, "tuned": 3.6, "diff": -0.037, "low": low, "high": 0.0}
        interval["beyond_noise"] = False
        return {
            "base": {"val": {"loss": 3.637}},
            "tuned": {"val": {"loss": 3.60}},
            "changed": {"val": 10.0},
            "paired": {"val": {"loss": interval}},
        }

    sure = evaluate.verdict(metrics(-0.05, 400), EvaluateParams())  # at most a 1.4% drop: it barely moved
    assert not sure["moved"] and "barely moved" in sure["warning"] and sure["noise"] is None
    unsure = evaluate.verdict(metrics(-0.5, 5), EvaluateParams())  # up to a 13.7% drop: 5 examples cannot tell
    assert unsure["moved"] and unsure["warning"] is None
    assert unsure["noise"].startswith("within noise, n too small") and "over 5 val examples" in unsure["noise"]
    assert "13.75%" in unsure["noise"] and "prepare.val_size" in unsure["noise"]
    assert evaluate.changed_rate([{"base": "a  b", "tuned": "a b"}, {"base": "a", "tuned": "c"}]) == 50.0


def test_per_example_losses_come_back_in_input_order(fmt):
    """The paired loss interval pairs example i of base with example i of tuned: answer_nll batches by length, so
    its per-example list must be put back in the order it was given."""
    import torch

    from llmft.infer import decode, loading

    model = loading.load_model(fmt, "float32")
    pairs = [
        fmt.encode([{"role": "user", "content": ex["instruction"]}, {"role": "assistant", "content": ex["output"]}])
        for ex in VAL
    ]
    per_example: list = []
    total, count = decode.answer_nll(
        model, [p for p, _ in pairs], [a for _, a in pairs], fmt.pad_id, batch_size=2, per_example=per_example
    )
    assert len({len(a) for _, a in pairs}) > 1  # lengths differ: the batches are not in input order
    with torch.inference_mode():
        for (prompt, answer), (nll, tokens) in zip(pairs, per_example):
            labels = torch.tensor([[-100] * len(prompt) + answer])
            expected = float(model(torch.tensor([prompt + answer]), labels=labels).loss) * len(answer)
            assert tokens == len(answer) and nll == pytest.approx(expected, rel=1e-4)
    assert sum(n for n, _ in per_example) == pytest.approx(total) and sum(t for _, t in per_example) == count


def test_held_out_pairs_are_ranked_by_base_sft_and_tuned_with_the_update_on_the_sft_model(
    tiny_model_dir, adapter_dir, tmp_path
):
    """The prefer stage's output: SFT (adapter_dir) + a preference LoRA, as one adapter with the update in delta/."""
    from conftest import make_lora
    from llmft.adapters import combine_adapters
    from llmft.data.pairs import write_pairs
    from llmft.infer.chat_format import load_chat_format
    from llmft.infer.loading import load_model, merge_adapter
    from llmft.pair_scores import load_pairs, pair_logps
    from llmft.params import EvaluateParams

    pairs = [{"instruction": f"Question {i}?", "input": "", "chosen": f"A kind answer {i}.", "rejected": f"No {i}."}
             for i in range(4)]  # fmt: skip
    write_pairs({"train": pairs[:1], "val": pairs}, "pairwise", tmp_path / "pairs")
    prefer = tmp_path / "prefer"
    combine_adapters(adapter_dir, make_lora(tiny_model_dir, tmp_path / "update", scale=0.3), prefer)
    shutil.copytree(tmp_path / "update", prefer / "delta")
    p = EvaluateParams(max_new_tokens=4, batch_size=2, num_threads=1, kept={"prompts": None}, dtype="float32")
    metrics, _ = evaluate.evaluate(
        p, write_data(tmp_path / "data", VAL), tiny_model_dir, prefer, {}, tmp_path / "pairs", adapter_dir
    )
    block = metrics["preference"]
    assert block["n"] == 4 and [k for k in block if k in ("base", "sft", "tuned")] == ["base", "sft", "tuned"]
    assert block["paired"]["tuned_vs_sft"]["margin"]["n"] == 4
    # each row is that model's own ranking: SFT is base + adapter_dir; tuned is base + the combined adapter
    fmt = load_chat_format(tiny_model_dir, p.cutoff_len)
    encoded = load_pairs(tmp_path / "pairs", fmt)
    for name, adapter in (("sft", adapter_dir), ("tuned", prefer)):
        logps = pair_logps(merge_adapter(load_model(fmt, "float32"), adapter), fmt, encoded, 2)
        margin = sum(c - r for c, r in logps) / 4
        assert block[name]["margin"] == pytest.approx(margin, abs=1e-3), name
    assert block["sft"]["margin"] != block["tuned"]["margin"] != block["base"]["margin"]
    # what preference tuning changed: the SFT model in the base's place, measured as the main comparison is
    after = metrics["preference_tuning"]
    assert after["compared"].startswith("base = the SFT model") and after["tuned"] == metrics["tuned"]
    sft_alone, _ = evaluate.evaluate(p, tmp_path / "data", tiny_model_dir, adapter_dir, {})
    assert after["base"]["val"]["loss"] == pytest.approx(sft_alone["tuned"]["val"]["loss"], abs=1e-4)
    assert after["paired"]["val"]["loss"]["n"] == len(VAL) and "sft_tokens_per_s" in metrics["speed"]


def test_no_pairs_or_kto_labels_add_no_preference_block(fmt, tmp_path):
    from llmft.data.pairs import write_pairs
    from llmft.pair_scores import load_pairs

    assert load_pairs(None, fmt) == [] and load_pairs(tmp_path / "missing", fmt) == []
    kto = [{"instruction": "Q?", "input": "", "output": "A.", "kto_tag": True}] * 2
    write_pairs({"train": kto, "val": kto}, "kto", tmp_path / "kto")
    assert load_pairs(tmp_path / "kto", fmt) == []
