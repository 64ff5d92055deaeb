"""lm-eval's results, base and tuned side by side: per task the scores, delta, noise and chance, and per question
both models' answers."""

from __future__ import annotations

import math

from llmft.stats import paired_difference


def leaves(results: dict, name: str) -> list[str]:
    """The scored tasks under `name`: itself, or a group's subtasks."""
    children = results.get("group_subtasks", {}).get(name) or []
    return [leaf for child in children for leaf in leaves(results, child)] if children else [name]


def scores(results: dict, name: str) -> dict:
    """{metric: value, metric_stderr: value} of one task or group, lm-eval's unfiltered ("none") numbers."""
    out = {}
    for key, value in results["results"][name].items():
        metric, _, filt = key.partition(",")
        if filt == "none" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[metric] = round(float(value), 6)
    return out


def sample_row(sample: dict, multiple_choice: bool) -> dict:
    """One model's side of a scored question: the choices' log-likelihoods and the one it picks, or its responses;
    and its metrics."""
    side = {m: sample[m] for m in sample.get("metrics", []) if isinstance(sample.get(m), (int, float))}
    if multiple_choice:
        loglik = [round(float(r[0]), 4) for r in sample["filtered_resps"]]  # (loglik, is_greedy) per choice
        return {"loglik": loglik, "pred": loglik.index(max(loglik)), **side}
    return {"resps": sample["filtered_resps"], **side}


def pair_samples(task: str, base: list[dict], tuned: list[dict], multiple_choice: bool) -> list[dict]:
    """One row per question: the prompt (and choices), and both models' answers side by side."""
    tuned_by_id = {s["doc_id"]: s for s in tuned}
    rows = []
    for s in base:
        args = s["arguments"]  # (context, continuation) per choice, or (context, generation kwargs)
        rows.append(
            {
                "task": task,
                "doc_id": s["doc_id"],
                "doc": s["doc"],
                "prompt": args[0][0],
                **({"choices": [a[1] for a in args]} if multiple_choice else {}),
                "target": s["target"],
                "base": sample_row(s, multiple_choice),
                "tuned": sample_row(tuned_by_id[s["doc_id"]], multiple_choice),
            }
        )
    return rows


def task_metrics(name: str, runs: dict[str, dict], rows: list[dict], num_fewshot: int) -> dict:
    """base, tuned, delta = tuned - base, n, chance, changed answers, the noise verdict of one task, whether the
    base scores beyond chance (above_chance: else a loss could not show) and the paired difference per question."""
    base, tuned = scores(runs["base"], name), scores(runs["tuned"], name)
    n_samples = runs["base"]["n-samples"]
    n = sum(n_samples[leaf]["effective"] for leaf in leaves(runs["base"], name) if leaf in n_samples)
    mine = [r for r in rows if r["task"] in leaves(runs["base"], name)]
    chance = None  # known for multiple choice: the mean of 1/choices
    if mine and all("choices" in r for r in mine):
        chance = round(sum(1 / len(r["choices"]) for r in mine) / len(mine), 6)
    out = {
        "base": base,
        "tuned": tuned,
        "delta": {k: round(tuned[k] - v, 6) for k, v in base.items() if k in tuned and not k.endswith("_stderr")},
        "n": n,
        "num_fewshot": num_fewshot,
        "chance": chance,
        "changed": sum(r["base"].get("pred") != r["tuned"].get("pred") for r in mine if "pred" in r["base"]),
    }
    metric = "acc" if "acc" in base else next((k for k in out["delta"] if f"{k}_stderr" in base), None)
    if metric and f"{metric}_stderr" in base and f"{metric}_stderr" in tuned:
        noise = 2 * math.hypot(base[f"{metric}_stderr"], tuned[f"{metric}_stderr"])
        out["within_noise"] = abs(out["delta"][metric]) <= noise  # +-2 standard errors of the difference
        out["noise"] = round(noise, 6)
    if chance is not None and metric in base and f"{metric}_stderr" in base:
        # a model at chance cannot get worse, so only a task the base passes can show what fine-tuning cost
        out["above_chance"] = base[metric] - chance > 2 * base[f"{metric}_stderr"]
    if metric and mine and all(metric in r["base"] and metric in r["tuned"] for r in mine):
        out["paired"] = paired_difference([r["base"][metric] for r in mine], [r["tuned"][metric] for r in mine])
    return out


def paired_rows(runs: dict[str, dict]) -> list[dict]:
    """Every scored question of every task, in task order: both models' answers side by side (see pair_samples)."""
    base_run, tuned_run = runs["base"], runs["tuned"]
    return [
        row
        for task in sorted(base_run["samples"])
        for row in pair_samples(
            task,
            base_run["samples"][task],
            tuned_run["samples"][task],
            multiple_choice=base_run["configs"][task].get("output_type") == "multiple_choice",
        )
    ]
