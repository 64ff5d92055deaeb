"""The report's body tables, one per section, from what the stages wrote: prepare.json's sources, eval.json's
metrics, predictions.jsonl's probes, everyday prompts and samples, benchmark.json's tasks.

    from llmft.report import sections
    display(sections.metrics_table(evals)); display(sections.samples("reports/predictions.jsonl", 10))

Nothing here computes a result of the pipeline: it reads, flattens and formats what the stages wrote, so the
notebook stays a page of drawing code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmft.predictions import KEPT, PROBE, PROMPT_SPLITS, read_predictions
from llmft.report.render import Table, flatten, fmt

LOWER_IS_BETTER = ("loss", "perplexity")


def sources_table(prep: dict) -> Table | None:
    """One row per input table of prepare.json: rows and examples in, kept, dropped by reason, per split."""
    sources = prep.get("sources") or {}
    if not sources:
        return None
    splits = list(prep.get("splits", {}))
    rows = []
    for name, src in sources.items():
        dropped = ", ".join(f"{reason} {n}" for reason, n in src["dropped"].items() if n) or "none"
        rows.append(
            [name, src["path"], fmt(src["rows_in"]), fmt(src["examples_in"]), fmt(src["kept"]), dropped]
            + [fmt(src.get("splits", {}).get(split, 0)) for split in splits]
        )
    return Table(rows, ["source", "file", "rows", "examples", "kept", "dropped"] + splits, text_columns=2)


def metrics_table(evals: dict) -> Table:
    """eval.json's base / tuned / delta (nested by split, then metric) as one row per split and metric."""
    base, tuned, delta = (flatten(evals.get(k) or {}) for k in ("base", "tuned", "delta"))
    rows = []
    for key, value in base.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        split, _, metric = key.partition(".") if "." in key else ("", "", key)
        arrow = "↓" if metric.rsplit(".", 1)[-1] in LOWER_IS_BETTER else "↑"
        rows.append(
            [
                split,
                f"{metric} {arrow}",
                fmt(value),
                fmt(tuned.get(key)),
                f"{delta[key]:+.4g}" if isinstance(delta.get(key), (int, float)) else "",
            ]
        )
    return Table(rows, ["split", "metric (↑/↓ = better)", "base", "fine-tuned", "Δ (tuned − base)"], text_columns=2)


def kept_table(predictions: str | Path, n: int | None = None) -> Table | None:
    """The everyday prompts (evaluate.kept) answered by both models, marked; `n` of them spread evenly, None = all."""
    rows = [r for r in read_predictions(predictions) if r.get("split") == KEPT]
    if not rows:
        return None
    if n is not None:
        rows = [rows[i * len(rows) // min(n, len(rows))] for i in range(min(n, len(rows)))]

    def marked(r: dict, name: str) -> str:
        marks = [f"✗ names {', '.join(r[f'{name}_leak'])}"] if r.get(f"{name}_leak") else []
        marks += {True: ["✓ right"], False: ["✗ wrong"]}.get(r.get(f"{name}_pass"), [])
        marks += ["✗ other language"] if r.get(f"{name}_lang") is False else []
        return (" · ".join(marks) + ": " if marks else "") + _answer(r.get(name))

    return Table(
        [[r["prompt"], ", ".join(r.get("expect") or []) or "—", marked(r, "base"), marked(r, "tuned")] for r in rows],
        ["everyday prompt", "expected", "base", "fine-tuned"],
        wrap=True,
    )


def probes_table(predictions: str | Path) -> Table | None:
    """evaluate.probes answered by both models side by side, each marked pass/fail; None when there are none."""
    rows = [r for r in read_predictions(predictions) if r.get("split") == PROBE]
    if not rows:
        return None

    def marked(r: dict, name: str) -> str:
        mark = {True: "✓ pass: ", False: "✗ fail: "}.get(r.get(f"{name}_pass"), "")  # text marks: any font has them
        return mark + _answer(r.get(name))

    return Table(
        [[r["prompt"], ", ".join(r.get("expect") or []) or "—", marked(r, "base"), marked(r, "tuned")] for r in rows],
        ["probe", "expected", "base", "fine-tuned"],
        wrap=True,
    )


def samples(predictions: str | Path, n: int) -> Table:
    """`n` predictions spread evenly over reports/predictions.jsonl (the same rows on every build; probes aside)."""
    rows = [r for r in read_predictions(predictions) if r.get("split") not in PROMPT_SPLITS]
    k = min(n, len(rows))
    picked = [rows[i * len(rows) // k] for i in range(k)]

    def prompt(r: dict) -> str:
        where = f"[{r['split']} #{r['index'] + 1}] " if "split" in r and "index" in r else ""
        return where + str(r.get("prompt", ""))

    return Table(
        [[prompt(r), r.get("label"), _answer(r.get("base")), _answer(r.get("tuned"))] for r in picked],
        ["prompt", "reference", "base", "fine-tuned"],
        wrap=True,
    )


def benchmark_table(bench: dict) -> Table:
    """One row per benchmark task: questions, shots, base and tuned accuracy ± stderr, delta, noise verdict, chance."""

    def acc(side: dict) -> str:
        return f"{100 * side['acc']:.1f} ± {100 * side.get('acc_stderr', 0):.1f}" if "acc" in side else "n/a"

    rows = []
    for name, t in bench["tasks"].items():
        delta = t["delta"].get("acc")
        verdict = "within noise" if t.get("within_noise") else "beyond noise" if "within_noise" in t else ""
        paired = t.get("paired")
        if paired and not verdict:
            verdict = "beyond noise" if paired["beyond_noise"] else "within noise"
        scale = 100 if paired and max(abs(paired["base"]), abs(paired["tuned"])) <= 1 else 1  # acc 0-1 or %
        interval = f" ({scale * paired['low']:+.1f} to {scale * paired['high']:+.1f})" if paired else ""
        rows.append(
            [
                name,
                fmt(t["n"]),
                fmt(t["num_fewshot"]),
                acc(t["base"]),
                acc(t["tuned"]),
                "" if delta is None else f"{100 * delta:+.1f}{interval}",
                verdict,
                "" if t.get("chance") is None else f"{100 * t['chance']:.0f}",
            ]
        )
    header = ["task", "questions", "shots", "base acc %", "fine-tuned acc %", "Δ points (95% CI)", "", "chance %"]
    return Table(rows, header, text_columns=1)


def benchmark_note(bench: dict, num_parameters: int | None) -> str:
    """What the benchmark numbers can and cannot say: near chance on a small model, within noise or not."""
    near = [
        n
        for n, t in bench["tasks"].items()
        if t.get("chance") and abs(t["base"].get("acc", 0) - t["chance"]) <= 2 * t["base"].get("acc_stderr", 1)
    ]
    lines = []
    if near:
        size = f"a {num_parameters / 1e6:.0f}M-parameter model" if num_parameters else "this model"
        lines.append(
            f"The base model scores within 2 standard errors of chance on {', '.join(near)}: {size} does not know "
            "these subjects, so the fine-tuned score says little about what fine-tuning cost; read it as a floor "
            "check, and run the benchmark on a bigger base model for numbers to report."
        )
    beyond = [n for n, t in bench["tasks"].items() if t.get("within_noise") is False]
    if beyond:
        lines.append(f"Beyond noise: {', '.join(beyond)} (the change is larger than 2 standard errors).")
    lines.append(
        f"lm-eval {bench.get('lm_eval_version', '?')}; per-question answers: `reports/benchmark/samples.jsonl`."
    )
    return " ".join(lines)


def _answer(text: Any) -> str:
    return "(empty)" if text is None or not str(text).strip() else str(text)  # a blank cell reads as missing
