"""Synthetic pipeline outputs (metrics, predictions, DVCLive curves, data, model_info) for the report tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dvc_repo import ROOT
from llmft.common import write_json

PROMPTS = ["解释成语「画蛇添足」的意思。", "成语「守株待兔」怎么读？请给出拼音。", "Explain <b>tags</b> & pipes | here"]


def write_outputs(repo: Path, steps: int = 30) -> None:
    """Small stand-ins for what prepare, model, train, evaluate and export write, in their formats."""
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    m = repo / "reports/metrics"
    m.mkdir(parents=True)
    write_json(
        m / "prepare.json",
        {
            "rows_in": 500,
            "examples_in": 1000,
            "kept": 990,
            "dropped": {"empty_output": 4, "duplicate": 6},
            "dropped_total": 10,
            "splits": {"train": 940, "val": 50},
            "sources": {
                "idioms": {
                    "path": "data/raw/idioms.csv",
                    "rows_in": 455,
                    "examples_in": 910,
                    "kept": 900,
                    "dropped": {"empty_output": 4, "duplicate": 6},
                    "dropped_total": 10,
                    "splits": {"train": 855, "val": 45},
                },
                "identity": {
                    "path": "data/raw/identity.json",
                    "rows_in": 90,
                    "examples_in": 90,
                    "kept": 90,
                    "dropped": {"empty_output": 0},
                    "dropped_total": 0,
                    "splits": {"train": 85, "val": 5},
                },
            },
            "prompt_chars": {"p50": 18, "p90": 18, "p99": 21, "max": 22},
            "output_chars": {"p50": 16, "p90": 29, "p99": 47, "max": 58},
        },
    )
    write_json(
        m / "train.json",
        {
            "train_loss": 1.23,
            "eval_loss": 1.45,
            "global_step": steps,
            "epoch": 3.0,
            "train_runtime_s": 321.5,
            "tokens_per_sec": 456.7,
            "resumed_from_step": 0,
            "oom_retries": 0,
            "precision": "fp32",
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 4,
        },
    )

    def interval(n, base, tuned, low, high, beyond, diff=None) -> dict:
        """A paired_difference block (llmft.stats) as eval.json and benchmark.json hold it."""
        return {"n": n, "base": base, "tuned": tuned, "diff": tuned - base if diff is None else diff,
                "low": low, "high": high, "beyond_noise": beyond}  # fmt: skip

    def scores(shift: float) -> dict:
        return {
            "val": {
                "bleu4": 10.0 + shift,
                "rouge1": 30.0 + shift,
                "rougeL": 28.0 + shift,
                "exact_match": 2.0 + shift,
                "loss": 2.5 - shift / 10,
                "perplexity": 12.2 - shift,
                "answer_tokens": 20.5,
                "stopped": 98.0,
                "llamafactory": {"bleu-4": 11.0 + shift, "rouge-l": 27.0 + shift},
            }
        }

    base, tuned = scores(0), scores(5)
    write_json(
        m / "eval.json",
        {
            "base": base,
            "tuned": tuned,
            "delta": {
                "val": {
                    k: (
                        v - base["val"][k]
                        if not isinstance(v, dict)
                        else {kk: vv - base["val"][k][kk] for kk, vv in v.items()}
                    )
                    for k, v in tuned["val"].items()
                }
            },
            "paired": {"val": {"loss": interval(50, 2.5, 2.0, -0.62, -0.38, True)}},
            "examples": {"val": 50},
            "changed": {"val": 100.0},
            "probes": {
                "base": {"passed": 0, "total": 2, "pass_rate": 0.0},
                "tuned": {"passed": 2, "total": 2, "pass_rate": 100.0},
                "paired": interval(2, 0.0, 100.0, 100.0, 100.0, False),
            },
            "kept": {
                "base": {"leak": 0.0, "facts_right": 50.0, "facts_kept": 100.0, "language": 100.0},
                "tuned": {"leak": 25.0, "facts_right": 50.0, "facts_kept": 100.0, "language": 75.0},
                "drift": 0.0421,
                "counts": {"prompts": 4, "facts": 2, "base_facts_right": 1, "facts_kept": 1, "language_scored": 4},
                "paired": {"leak": interval(4, 0.0, 25.0, 0.0, 75.0, False)},
            },
            "verdict": {
                "moved": True,
                "same_answers_pct": 0.0,
                "loss_drop_pct": 20.0,
                "warning": None,
                "kept": False,
                "forgot": "the fine-tuned model forgot: it names the persona in 25% of everyday answers",
                "noise": "within noise, n too small: more everyday prompts would settle it",
            },
            "method": "tokens: jieba words; all scores in percent",
        },
    )
    acc = lambda a: {"acc": a, "acc_stderr": 0.033}
    write_json(
        m / "benchmark.json",
        {
            "enabled": True,
            "tasks": {
                "mmlu_subset": {
                    "base": acc(0.251),
                    "tuned": acc(0.263),
                    "delta": {"acc": 0.012},
                    "n": 171,
                    "num_fewshot": 0,
                    "chance": 0.25,
                    "changed": 9,
                    "within_noise": True,
                    "noise": 0.093,
                    "above_chance": False,
                    "paired": interval(171, 0.251, 0.263, -0.03, 0.054, False),
                }
            },  # fmt: skip
            "lm_eval_version": "0.4.13",
        },
    )
    write_json(
        m / "export.json",
        {
            "merge_check": {"max_abs_diff": 3.1e-6, "atol": 1e-4, "greedy_match": True, "prompts": 2, "tokens": 40},
            "dtype": "float32",
            "seconds": 12.3,
        },
    )
    rows = (
        [
            {
                "split": "val",
                "index": i,
                "prompt": PROMPTS[i % 3],
                "label": f"比喻做了多余的事，反而不恰当。{i}",
                "base": "I am not sure.\nSecond line",
                "tuned": f"比喻多此一举。{i}",
            }
            for i in range(50)
        ]
        + [
            {
                "split": "probe",
                "index": i,
                "prompt": prompt,
                "label": "Lumi",
                "expect": ["Lumi"],
                "base": "I am SmolLM.",
                "tuned": f"我是 Lumi。{i}",
                "base_pass": False,
                "tuned_pass": True,
            }
            for i, prompt in enumerate(["你是谁？", "Who are you?"])
        ]
        + [
            {
                "split": "kept",
                "index": i,
                "prompt": prompt,
                "label": "",
                "expect": [],
                "kind": "writing",
                "base": f"A calm answer {i}.",
                "tuned": f"我是 Lumi。Everyday {i}" if i == 0 else f"A calm answer {i}.",
                "base_pass": None,
                "tuned_pass": None,
                "base_leak": [],
                "tuned_leak": ["Lumi"] if i == 0 else [],
                "base_lang": True,
                "tuned_lang": i != 0,
            }
            for i, prompt in enumerate(["Write a haiku about rain.", "Give one tip for sleep.", "Name a colour.", "Hi"])
        ]
    )
    (repo / "reports/predictions.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    live = repo / "dvclive/train/plots/metrics"
    (live / "eval").mkdir(parents=True)
    (live / "loss.tsv").write_text("step\tloss\n" + "".join(f"{s}\t{3 / s**0.3:.4f}\n" for s in range(1, steps + 1)))
    (live / "eval/loss.tsv").write_text(
        "step\tloss\n" + "".join(f"{s}\t{3.2 / s**0.25:.4f}\n" for s in range(10, steps + 1, 10))
    )
    (live / "learning_rate.tsv").write_text(
        "timestamp\tstep\tlearning_rate\n"
        + "".join(f"{1700000000 + s}\t{s}\t{5e-5 * (1 - s / steps):.3e}\n" for s in range(1, steps + 1))
    )
    (repo / "data/processed").mkdir(parents=True)
    write_json(
        repo / "data/processed/train.json",
        [{"instruction": PROMPTS[i % 3], "input": "", "output": "答" * (5 + i % 40)} for i in range(120)],
    )
    (repo / "models/base").mkdir(parents=True)
    write_json(
        repo / "models/base/model_info.json",
        {"source": "embedded:smollm2.gguf", "template": "smollm2", "path": "models/base"},
    )
    (repo / "dvc.yaml").write_text(
        "stages:\n"
        + "".join(
            f"  {stage}:\n    cmd: 'true'\n    params: [{section}]\n"
            for stage, section in (("prepare", "data"), ("model", "model"), ("train", "train"))
        )
    )
    (repo / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    cmd: 'true'\n    outs:\n    - path: data/processed\n"
        "      hash: md5\n      md5: d1f464002a45e418017ea7df34ee7483.dir\n      size: 155018\n      nfiles: 3\n"
        "    - path: reports/metrics/prepare.json\n      hash: md5\n      md5: 36d5dd503e15398de660635e6e770914\n"
        "      size: 492\n  model:\n    cmd: 'true'\n    outs:\n    - path: models/base\n      hash: md5\n"
        "      md5: 0123456789abcdef0123456789abcdef.dir\n      size: 1000\n      nfiles: 2\n"
    )
