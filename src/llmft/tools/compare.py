"""`make compare A=<exp> B=<exp>`: what changed between two experiments, and which answers got worse.

    python -m llmft.tools.compare <A> <B> [--top 5]     # A, B: experiment names (dvc exp show), commits, branches, tags
    python -m llmft.tools.compare <A>                   # A against the workspace

Prints `dvc params diff` and `dvc metrics diff` from A to B, the benchmark accuracies (reports/metrics/benchmark.json)
apart, then the val (and test) examples whose tuned
answer lost the most ROUGE-L F1 (jieba words for Chinese; see src/llmft/metrics.py) from A to B, each with
the reference and both answers. The answers come from reports/predictions.jsonl of each revision, read
through DVC (from the local cache or the remote), so nothing is checked out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llmft.common import UserError, run_main
from llmft.env import dvc
from llmft.metrics import rouge_l
from llmft.predictions import PROMPT_SPLITS, parse_predictions

BENCHMARK = "reports/metrics/benchmark.json"


def load_predictions(path: str, rev: str | None) -> dict[tuple, dict]:
    """Prediction rows of one revision (None = the workspace), keyed by split, prompt and reference."""
    import dvc.api

    try:
        text = (
            Path(path).read_text(encoding="utf-8")
            if rev is None
            else dvc.api.read(path, repo=".", rev=rev, encoding="utf-8")
        )
    except Exception as exc:  # a DVC or git error, whatever its class: name the revision and the way out
        where = rev or "the workspace"
        raise UserError(
            f"{path} of {where} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            f"check the name with `dvc exp show`, or `dvc pull` / `dvc exp pull` it"
        ) from None
    return {
        (r["split"], r["prompt"], r["label"]): r for r in parse_predictions(text) if r["split"] not in PROMPT_SPLITS
    }


def dropped(a: dict[tuple, dict], b: dict[tuple, dict], top: int) -> tuple[list[dict], int]:
    """The `top` examples whose tuned answer scores lowest in B relative to A; and how many examples matched."""
    rows = []
    for key in a.keys() & b.keys():
        score_a, score_b = rouge_l(a[key]["tuned"], key[2]), rouge_l(b[key]["tuned"], key[2])
        rows.append(
            {
                "split": key[0],
                "prompt": key[1],
                "label": key[2],
                "a": a[key]["tuned"],
                "b": b[key]["tuned"],
                "score_a": score_a,
                "score_b": score_b,
                "drop": round(score_a - score_b, 4),
            }
        )
    rows.sort(key=lambda r: (-r["drop"], r["split"], r["prompt"]))
    return [r for r in rows[:top] if r["drop"] > 0], len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", help="the reference: an experiment name, commit, branch or tag")
    parser.add_argument("b", nargs="?", help="the one compared with it; default: the workspace")
    parser.add_argument("--top", type=int, default=5, help="how many of the most-dropped examples to print")
    parser.add_argument("--predictions", default="reports/predictions.jsonl")
    args = parser.parse_args(argv)
    if not args.a:
        raise UserError("usage: make compare A=<exp> B=<exp>; list experiments with `dvc exp show`")

    revs = [args.a] + ([args.b] if args.b else [])
    name_b = args.b or "workspace"
    print(f"== params: {args.a} -> {name_b} (dvc params diff)")
    print(dvc("params", "diff", *revs).strip() or "no params changed")
    print(f"\n== metrics: {args.a} -> {name_b} (dvc metrics diff)")
    print(dvc("metrics", "diff", *revs).strip() or "no metrics changed")
    print(f"\n== benchmarks: {args.a} -> {name_b} (accuracy of base and tuned per lm-eval task)")
    bench = dvc("metrics", "diff", *revs, "--targets", BENCHMARK).strip()
    print(bench or f"no benchmark metric changed (or {BENCHMARK} is in neither: make benchmark)")

    a, b = load_predictions(args.predictions, args.a), load_predictions(args.predictions, args.b)
    worst, matched = dropped(a, b, args.top)
    print(
        f"\n== answers that got worse: tuned ROUGE-L F1 (%), {args.a} -> {name_b}; {matched} examples in both, "
        f"{len(a) - matched} only in {args.a}, {len(b) - matched} only in {name_b}"
    )
    if not worst:
        print(f"no example scored lower in {name_b}")
    for i, r in enumerate(worst, 1):
        print(
            f"\n{i}. [{r['split']}] {r['prompt']}\n   reference: {r['label']}\n"
            f"   {args.a} ({r['score_a']:.1f}): {r['a']}\n   {name_b} ({r['score_b']:.1f}): {r['b']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
