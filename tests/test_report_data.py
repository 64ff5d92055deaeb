"""The report's loaders (src/llmft/report/data.py): tables, curves, lengths, samples, params diff."""

from __future__ import annotations

import json

import pytest

import llmft.report.data as rd
from llmft.common import write_json
from report_outputs import write_outputs


def test_metrics_table_flattens_splits_and_marks_direction():
    evals = {
        "base": {"val": {"bleu4": 10.0, "loss": 2.0, "llamafactory": {"rouge-l": 5.0}}},
        "tuned": {"val": {"bleu4": 15.0, "loss": 1.5, "llamafactory": {"rouge-l": 7.0}}},
        "delta": {"val": {"bleu4": 5.0, "loss": -0.5, "llamafactory": {"rouge-l": 2.0}}},
    }
    rows = rd.metrics_table(evals).rows
    assert rows == [
        ["val", "bleu4 ↑", "10", "15", "+5"],
        ["val", "loss ↓", "2", "1.5", "-0.5"],
        ["val", "llamafactory.rouge-l ↑", "5", "7", "+2"],
    ]


def test_table_escapes_html_and_markdown():
    table = rd.Table([["<b>x</b> | y\nz", None]], ["a", "b"])
    assert "&lt;b&gt;x&lt;/b&gt;" in table._repr_html_()
    assert "| &lt;b&gt;x&lt;/b&gt; \\| y<br>z |   |" in table._repr_markdown_()


def test_curves_read_dvclive_and_train_layouts(tmp_path):
    write_outputs(tmp_path)
    series = rd.curves(tmp_path / "dvclive/train/plots/metrics")
    assert set(series) == {"loss", "eval/loss", "learning_rate"}
    assert list(series["learning_rate"].columns) == ["step", "value"]
    assert series["eval/loss"].step.tolist() == [10, 20, 30]


def test_lengths_use_the_tokenizer_when_one_is_on_disk(tmp_path, smol_tokenizer_dir):
    write_json(tmp_path / "train.json", [{"instruction": "Hello world", "input": "", "output": "Hi"}])
    assert rd.example_lengths(tmp_path / "train.json", tmp_path)[1] == "characters"
    write_json(tmp_path / "model_info.json", {"path": str(smol_tokenizer_dir), "template": "smollm2"})  # a pointer
    lengths, unit = rd.example_lengths(tmp_path / "train.json", tmp_path)
    assert unit == "tokens" and 3 <= lengths[0] <= 6


def test_samples_are_spread_evenly_and_never_repeated(tmp_path):
    rows = [{"split": "val", "index": i, "prompt": f"q{i}", "label": "a", "base": "", "tuned": "b"} for i in range(3)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r[0] for r in rd.samples(tmp_path / "p.jsonl", 10).rows] == ["[val #1] q0", "[val #2] q1", "[val #3] q2"]
    assert [r[0] for r in rd.samples(tmp_path / "p.jsonl", 2).rows] == ["[val #1] q0", "[val #2] q1"]
    assert rd.samples(tmp_path / "p.jsonl", 1).rows[0][2] == "(empty)"
    assert rd.samples(tmp_path / "p.jsonl", 0).rows == []


@pytest.mark.integration
def test_params_diff_without_a_previous_commit_says_so(tmp_path):
    assert "No previous commit" in rd.params_diff(tmp_path)


def test_first_table_puts_what_was_learned_beside_what_it_cost_and_the_verdict_warns():
    evals = {
        "base": {"val": {"loss": 2.0}},
        "tuned": {"val": {"loss": 1.5}},
        "changed": {"val": 64.0},
        "probes": {
            "base": {"passed": 0, "total": 4, "pass_rate": 0.0},
            "tuned": {"passed": 3, "total": 4, "pass_rate": 75.0},
        },
        "verdict": {"moved": True, "warning": None, "kept": True, "forgot": None},
    }
    learned = "\n".join(rd.learned(evals))
    assert "2.000 → 1.500 (-25.0%)" in learned and "Probes passed: 0/4 → 3/4" in learned and "val 64%" in learned
    assert rd.cost(evals) == ["Not measured: eval.kept.prompts is null."]
    evals["persona"] = {"examples": 13, "base": 0.0, "tuned": 84.62}
    assert "Persona named in held-out answers that should (13): 0% → 84.62%" in rd.learned(evals)
    learned = "\n".join(rd.learned(evals))
    evals["kept"] = {
        "base": {"leak": 0.0, "facts_right": 40.0, "facts_kept": 100.0, "language": 90.0},
        "tuned": {"leak": 3.12, "facts_right": 36.0, "facts_kept": 92.31, "language": 88.0},
        "drift": 0.1234,
        "counts": {"prompts": 64, "facts": 26, "base_facts_right": 13, "facts_kept": 12},
    }
    table = rd.learn_and_cost(evals)
    assert table.header == ["Did it learn?", "What did it cost?"] and table.rows[0][0] == learned
    assert table.rows[0][1].splitlines() == [
        "Persona named unasked (64 everyday prompts): 0% → 3.12%",
        "Facts the base got right, still right: 12/13 (92.31%)",
        "Answered in the prompt's language: 90% → 88%",
        "Drift (base's own answers, nats/token): +0.123",
    ]
    assert "kept what it knew" in rd.verdict(evals)
    forgot = {"moved": True, "warning": None, "kept": False, "forgot": "the fine-tuned model forgot: it leaks"}
    assert rd.verdict(evals | {"verdict": forgot}) == "> **Warning**: the fine-tuned model forgot: it leaks."
    stalled = evals | {"verdict": {"moved": False, "warning": "the fine-tuned model barely moved: raise it"}}
    assert "**Warning**: the fine-tuned model barely moved: raise it." in rd.verdict(stalled)
    no_probes = {k: v for k, v in evals.items() if k != "probes"}
    assert "Probes" not in "\n".join(rd.learned(no_probes))


def test_kept_table_marks_leaks_facts_and_language_and_spreads_a_sample(tmp_path):
    from llmft.predictions import write_predictions

    kept = [
        {"split": "kept", "index": i, "prompt": f"p{i}", "expect": ["Paris"] if i == 0 else [], "base": "Paris.",
         "tuned": "Lumi: Paris.", "base_pass": True if i == 0 else None, "tuned_pass": True if i == 0 else None,
         "base_leak": [], "tuned_leak": ["Lumi"], "base_lang": True, "tuned_lang": i != 3}
        for i in range(6)
    ]  # fmt: skip
    write_predictions(tmp_path / "p.jsonl", [{"split": "val", "index": 0, "prompt": "q", "label": "a"}] + kept)
    table = rd.kept_table(tmp_path / "p.jsonl")
    assert [r[0] for r in table.rows] == [f"p{i}" for i in range(6)]
    assert table.rows[0][2:] == ["✓ right: Paris.", "✗ names Lumi · ✓ right: Lumi: Paris."]
    assert table.rows[3][3] == "✗ names Lumi · ✗ other language: Lumi: Paris."
    assert [r[0] for r in rd.kept_table(tmp_path / "p.jsonl", 3).rows] == ["p0", "p2", "p4"]


def test_sources_table_lists_each_table_with_drops_and_splits():
    prep = {
        "splits": {"train": 8, "val": 2},
        "sources": {
            "a": {
                "path": "data/raw/a.csv",
                "rows_in": 6,
                "examples_in": 6,
                "kept": 5,
                "dropped": {"duplicate": 1},
                "splits": {"train": 4, "val": 1},
            },
            "b": {
                "path": "data/raw/b.json",
                "rows_in": 5,
                "examples_in": 5,
                "kept": 5,
                "dropped": {"duplicate": 0},
                "splits": {"train": 4, "val": 1},
            },
        },
    }
    table = rd.sources_table(prep)
    assert table.rows[0] == ["a", "data/raw/a.csv", "6", "6", "5", "duplicate 1", "4", "1"]
    assert table.rows[1][5] == "none" and rd.sources_table({"splits": {}}) is None
