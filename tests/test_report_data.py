"""The report's readers (src/llmft/report/: render, summary, sections, figures, provenance): tables, first screen,
curves, lengths, samples, params diff."""

from __future__ import annotations

import json

import pytest

from llmft.common import write_json
from llmft.report import figures, provenance, render, sections, summary
from report_outputs import write_outputs


def test_metrics_table_flattens_splits_and_marks_direction():
    evals = {
        "base": {"val": {"bleu4": 10.0, "loss": 2.0, "llamafactory": {"rouge-l": 5.0}}},
        "tuned": {"val": {"bleu4": 15.0, "loss": 1.5, "llamafactory": {"rouge-l": 7.0}}},
        "delta": {"val": {"bleu4": 5.0, "loss": -0.5, "llamafactory": {"rouge-l": 2.0}}},
    }
    rows = sections.metrics_table(evals).rows
    assert rows == [
        ["val", "bleu4 ↑", "10", "15", "+5"],
        ["val", "loss ↓", "2", "1.5", "-0.5"],
        ["val", "llamafactory.rouge-l ↑", "5", "7", "+2"],
    ]


def test_table_escapes_html_and_markdown():
    table = render.Table([["<b>x</b> | y\nz", None]], ["a", "b"])
    assert "&lt;b&gt;x&lt;/b&gt;" in table._repr_html_()
    assert "| &lt;b&gt;x&lt;/b&gt; \\| y<br>z |   |" in table._repr_markdown_()


def test_curves_read_dvclive_and_train_layouts(tmp_path):
    write_outputs(tmp_path)
    series = figures.curves(tmp_path / "dvclive/train/plots/metrics")
    assert set(series) == {"loss", "eval/loss", "learning_rate"}
    assert list(series["learning_rate"].columns) == ["step", "value"]
    assert series["eval/loss"].step.tolist() == [10, 20, 30]


def test_lengths_use_the_tokenizer_when_one_is_on_disk(tmp_path, smol_tokenizer_dir):
    write_json(tmp_path / "train.json", [{"instruction": "Hello world", "input": "", "output": "Hi"}])
    assert figures.example_lengths(tmp_path / "train.json", tmp_path)[1] == "characters"
    write_json(tmp_path / "model_info.json", {"path": str(smol_tokenizer_dir), "template": "smollm2"})  # a pointer
    lengths, unit = figures.example_lengths(tmp_path / "train.json", tmp_path)
    assert unit == "tokens" and 3 <= lengths[0] <= 6


def test_samples_are_spread_evenly_and_never_repeated(tmp_path):
    rows = [{"split": "val", "index": i, "prompt": f"q{i}", "label": "a", "base": "", "tuned": "b"} for i in range(3)]
    (path := tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r[0] for r in sections.samples(path, 10).rows] == ["[val #1] q0", "[val #2] q1", "[val #3] q2"]
    assert [r[0] for r in sections.samples(path, 2).rows] == ["[val #1] q0", "[val #2] q1"]
    assert sections.samples(path, 1).rows[0][2] == "(empty)"
    assert sections.samples(path, 0).rows == []


@pytest.mark.integration
def test_params_diff_without_a_previous_commit_says_so(tmp_path):
    assert "No previous commit" in provenance.params_diff(tmp_path)


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
    learned = "\n".join(summary.learned(evals))
    assert "2.000 → 1.500 (-25.0%)" in learned and "Probes passed: 0/4 → 3/4" in learned and "val 64%" in learned
    assert summary.cost(evals) == ["Not measured: evaluate.kept.prompts is null."]
    evals["persona"] = {"examples": 13, "base": 0.0, "tuned": 84.62}
    assert "Persona named in held-out answers that should: 0/13 (0%, 95% CI 0–23%) → 11/13 (85%, 95% CI 58–96%)" in (
        summary.learned(evals)
    )
    learned = "\n".join(summary.learned(evals))
    evals["kept"] = {
        "base": {"leak": 0.0, "facts_right": 40.0, "facts_kept": 100.0, "language": 90.0},
        "tuned": {"leak": 3.12, "facts_right": 36.0, "facts_kept": 92.31, "language": 88.0},
        "drift": 0.1234,
        "counts": {"prompts": 64, "facts": 26, "base_facts_right": 13, "facts_kept": 12, "language_scored": 50},
    }
    table = summary.learn_and_cost(evals)
    assert table.header == ["Did it learn?", "What did it cost?"] and table.rows[0][0] == learned
    assert table.rows[0][1].splitlines() == [
        "Persona named unasked: 0/64 (0%, 95% CI 0–6%) → 2/64 (3%, 95% CI 1–11%)",
        "Facts the base got right, kept: 12/13 (92%, 95% CI 67–99%)",
        "Facts right: 10/26 (40%, 95% CI 22–57%) → 9/26 (36%, 95% CI 19–54%)",
        "Answered in the prompt's language: 45/50 (90%, 95% CI 79–96%) → 44/50 (88%, 95% CI 76–94%)",
        "Drift (base's own answers, nats/token): +0.123",
    ]
    assert "kept what it knew" in summary.verdict(evals)
    forgot = {"moved": True, "warning": None, "kept": False, "forgot": "the fine-tuned model forgot: it leaks"}
    assert summary.verdict(evals | {"verdict": forgot}) == "> **Warning**: the fine-tuned model forgot: it leaks."
    stalled = evals | {"verdict": {"moved": False, "warning": "the fine-tuned model barely moved: raise it"}}
    assert "**Warning**: the fine-tuned model barely moved: raise it." in summary.verdict(stalled)
    no_probes = {k: v for k, v in evals.items() if k != "probes"}
    assert "Probes" not in "\n".join(summary.learned(no_probes))


def test_kept_table_marks_leaks_facts_and_language_and_spreads_a_sample(tmp_path):
    from llmft.predictions import write_predictions

    kept = [
        {"split": "kept", "index": i, "prompt": f"p{i}", "expect": ["Paris"] if i == 0 else [], "base": "Paris.",
         "tuned": "Lumi: Paris.", "base_pass": True if i == 0 else None, "tuned_pass": True if i == 0 else None,
         "base_leak": [], "tuned_leak": ["Lumi"], "base_lang": True, "tuned_lang": i != 3}
        for i in range(6)
    ]  # fmt: skip
    write_predictions(tmp_path / "p.jsonl", [{"split": "val", "index": 0, "prompt": "q", "label": "a"}] + kept)
    table = sections.kept_table(tmp_path / "p.jsonl")
    assert [r[0] for r in table.rows] == [f"p{i}" for i in range(6)]
    assert table.rows[0][2:] == ["✓ right: Paris.", "✗ names Lumi · ✓ right: Lumi: Paris."]
    assert table.rows[3][3] == "✗ names Lumi · ✗ other language: Lumi: Paris."
    assert [r[0] for r in sections.kept_table(tmp_path / "p.jsonl", 3).rows] == ["p0", "p2", "p4"]


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
    table = sections.sources_table(prep)
    assert table.rows[0] == ["a", "data/raw/a.csv", "6", "6", "5", "duplicate 1", "4", "1"]
    assert table.rows[1][5] == "none" and sections.sources_table({"splits": {}}) is None


def interval(n, base, tuned, low, high, beyond):
    return {
        "n": n,
        "base": base,
        "tuned": tuned,
        "diff": tuned - base,
        "low": low,
        "high": high,
        "beyond_noise": beyond,
    }


def test_first_table_gives_each_change_its_paired_interval_and_noise_verdict():
    evals = {
        "base": {"val": {"loss": 2.0}},
        "tuned": {"val": {"loss": 1.5}},
        "paired": {"val": {"loss": interval(40, 2.0, 1.5, -0.61, -0.39, True)}},
        "persona": {"examples": 11, "base": 0.0, "tuned": 81.82, "paired": interval(11, 0.0, 81.82, 54.5, 100.0, True)},
        "kept": {
            "base": {"leak": 0.0, "facts_right": 55.0, "facts_kept": 100.0, "language": 100.0},
            "tuned": {"leak": 6.25, "facts_right": 50.0, "facts_kept": 81.82, "language": 100.0},
            "drift": 0.05,
            "counts": {"prompts": 16, "facts": 20, "base_facts_right": 11, "facts_kept": 9, "facts_gained": 1},
            "paired": {
                "leak": interval(16, 0.0, 6.25, 0.0, 18.75, False),
                "facts_right": interval(20, 55.0, 50.0, -20.0, 10.0, False),
                "drift": interval(16, 1.0, 1.05, 0.01, 0.09, True),
            },
        },
    }
    learned = summary.learned(evals)
    assert learned[0] == "Eval loss (val): 2.000 → 1.500 (-25.0%; Δ -0.500 nats/token, 95% CI -0.610 to -0.390, " + (
        "beyond noise, n 40)"
    )
    assert learned[1].endswith("→ 9/11 (82%, 95% CI 52–95%) (Δ +82 points, 95% CI +54 to +100, beyond noise)")
    cost = summary.cost(evals)
    assert cost[0].endswith("→ 1/16 (6%, 95% CI 1–28%) (Δ +6 points, 95% CI +0 to +19, within noise)")
    assert cost[1] == "Facts the base got right, kept: 9/11 (82%, 95% CI 52–95%)"  # its Δ from 100% says nothing
    assert cost[2] == "Facts right: 11/20 (55%, 95% CI 34–74%) → 10/20 (50%, 95% CI 30–70%) (2 lost, 1 gained) " + (
        "(Δ -5 points, 95% CI -20 to +10, within noise)"
    )
    assert cost[4] == "Drift (base's own answers, nats/token): +0.050 (Δ +0.050, 95% CI +0.010 to +0.090, beyond noise)"


def test_a_change_on_too_few_items_is_not_called_beyond_noise():
    assert summary.change(interval(2, 0.0, 100.0, 100.0, 100.0, False)) == (
        "Δ +100 points, 95% CI +100 to +100, within noise: too few items changed to tell"
    )


def test_rate_of_no_items_is_not_a_number():
    assert summary.rate(None, 0) == "n/a" and summary.rate(50.0, 0) == "n/a"
    assert summary.rate(100.0, 3) == "3/3 (100%, 95% CI 44–100%)"


def test_verdict_within_noise_is_said_and_does_not_claim_it_kept():
    evals = {"verdict": {"moved": True, "warning": None, "kept": True, "forgot": None,
                         "noise": "within noise, n too small: more everyday prompts would settle it"}}  # fmt: skip
    text = summary.verdict(evals)
    assert "**Not settled**: within noise, n too small: more everyday prompts would settle it." in text
    assert "kept what it knew" not in text
    evals["verdict"]["noise"] = None
    assert "kept what it knew" in summary.verdict(evals) and "Not settled" not in summary.verdict(evals)


def test_benchmark_reach_names_the_tasks_that_can_and_cannot_see_a_change():
    bench = {
        "tasks": {
            "arc_easy": {"above_chance": True, "paired": interval(500, 0.42, 0.40, -0.035, -0.005, True)},
            "mmlu": {"above_chance": False, "paired": interval(171, 0.251, 0.263, -0.03, 0.054, False)},
            "ceval": {"above_chance": False},
        }
    }
    line = summary.benchmark_reach(bench)
    assert "can see a change for this model (the base scores beyond chance): arc_easy (Δ -2.0 points, 95% CI " in line
    assert "-3.5 to -0.5, beyond noise)" in line
    assert "(the base is at chance, so a loss would not show): mmlu (Δ +1.2 points" in line and "ceval." in line
    assert summary.benchmark_reach({"tasks": {"mmlu": {"acc": 0.25}}}) == ""  # an older benchmark.json: no line
    assert summary.benchmark_reach({}) == ""
    row = sections.benchmark_table(
        {
            "tasks": {
                "arc_easy": {
                    "base": {"acc": 0.42},
                    "tuned": {"acc": 0.40},
                    "delta": {"acc": -0.02},
                    "n": 500,
                    "num_fewshot": 0,
                    "paired": bench["tasks"]["arc_easy"]["paired"],
                }
            }
        }  # fmt: skip
    ).rows[0]
    assert row[5:7] == ["-2.0 (-3.5 to -0.5)", "beyond noise"]


def test_preference_line_names_each_models_accuracy_and_the_change_against_sft():
    from llmft.report import summary
    from llmft.stats import paired_difference

    assert summary.preference({}) == ""
    correct = {"sft": [0.0] * 5 + [100.0] * 5, "tuned": [100.0] * 10}
    block = {
        "n": 10,
        "base": {"accuracy": 40.0, "margin": -0.5},
        "sft": {"accuracy": 50.0, "margin": 0.1},
        "tuned": {"accuracy": 100.0, "margin": 2.25},
        "paired": {"tuned_vs_sft": {"accuracy": paired_difference(correct["sft"], correct["tuned"]),
                                    "margin": paired_difference([0.1] * 10, [2.25] * 10)}},
    }  # fmt: skip
    line = summary.preference({"preference": block})
    assert "base 4/10 (40%" in line and "sft 5/10 (50%" in line and "tuned 10/10 (100%" in line
    assert "Δ +50 points" in line and "against SFT" in line and "+2.25 nats" in line


def test_against_sft_draws_the_first_screen_again_with_sft_as_the_base():
    from llmft.report import summary

    assert summary.against_sft({}) is None
    block = {
        "base": {"val": {"loss": 1.2}},
        "tuned": {"val": {"loss": 1.1}},
        "probes": {"base": {"passed": 3, "total": 5}, "tuned": {"passed": 5, "total": 5}},
    }
    table = summary.against_sft({"preference_tuning": block})
    text = table._repr_markdown_()
    assert table.header == ["Learned: SFT → + preference tuning", "Kept: SFT → + preference tuning"]
    assert "Probes passed: 3/5 → 5/5" in text and "Eval loss (val): 1.200 → 1.100" in text
    assert "Not measured: evaluate.kept.prompts is null." in text
