"""`make compare A=<exp> B=<exp>`: what changed between two experiments, and which answers got worse.

    python -m llmft.tools.compare <A> <B> [--top 5]     # A, B: experiment names (dvc exp show), commits, branches, tags
    python -m llmft.tools.compare <A>                   # A against the workspace

Prints `dvc params diff` and `dvc metrics diff` from A to B, the benchmark accuracies (reports/metrics/benchmark.json)
apart, then each tuned-model difference from A to B with its paired 95% interval over the same items (llmft.stats:
per-example val/test loss and ROUGE-L F1; facts right, persona leak and language on the everyday prompts; probes
passed), `*` marking those beyond noise, then the val (and test) examples whose tuned
answer lost the most ROUGE-L F1 (jieba words for Chinese; see src/llmft/metrics.py) from A to B, each with
the reference and both answers. The answers come from reports/predictions.jsonl of each revision, read
through DVC (from the local cache or the remote), so nothing is checked out.

Two runs evaluated on different items (another val split, other everyday prompts or probes) are not paired: that
split gets one line saying so and no interval, the rest of the comparison still prints, and the exit status is 0
(the params and metrics diffs say why the items differ). A pair needs the very same items in both.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llmft.common import UserError, run_main
from llmft.env import dvc
from llmft.metrics import rouge_l
from llmft.predictions import KEPT, PROBE, PROMPT_SPLITS, parse_predictions
from llmft.stats import paired_difference

BENCHMARK = "reports/metrics/benchmark.json"


def load_predictions(path: str, rev: str | None, prompts: bool = False) -> dict[tuple, dict]:
    """Prediction rows of one revision (None = the workspace), keyed by split, prompt and reference; the probes'
    and everyday prompts' rows only with `prompts`."""
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
        (r["split"], r["prompt"], r["label"]): r
        for r in parse_predictions(text)
        if prompts or r["split"] not in PROMPT_SPLITS
    }


# What is paired, per split: (label, the score of a row's tuned answer; None = not scored).
SCORES = {
    "examples": [
        ("loss (nats/token)", lambda r: r.get("tuned_loss")),
        ("ROUGE-L F1 (%)", lambda r: rouge_l(r["tuned"], r["label"])),
    ],
    KEPT: [
        ("facts right (%)", lambda r: None if r.get("tuned_pass") is None else 100.0 * r["tuned_pass"]),
        ("persona leak (%)", lambda r: None if "tuned_leak" not in r else 100.0 * bool(r["tuned_leak"])),
        ("language kept (%)", lambda r: None if r.get("tuned_lang") is None else 100.0 * r["tuned_lang"]),
    ],
    PROBE: [("probes passed (%)", lambda r: None if r.get("tuned_pass") is None else 100.0 * r["tuned_pass"])],
}


def paired(a: dict[tuple, dict], b: dict[tuple, dict]) -> list[tuple[str, str, dict | None, str]]:
    """(split, metric, paired_difference of the tuned answers from A to B or None, why none) per split and metric.

    A split whose items differ between A and B gets one entry, with no interval: its items are not pairs.
    """
    out = []
    for split in sorted({k[0] for k in a.keys() | b.keys()}):
        keys_a, keys_b = {k for k in a if k[0] == split}, {k for k in b if k[0] == split}
        if keys_a != keys_b:
            why = (
                f"different eval sets ({len(keys_a - keys_b)} items only in A, {len(keys_b - keys_a)} only in B): "
                "not compared; evaluate both on the same items"
            )
            out.append((split, "all", None, why))
            continue
        keys = sorted(keys_a)
        for label, score in SCORES.get(split, SCORES["examples"]):
            pairs = [(score(a[k]), score(b[k])) for k in keys]
            pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
            if not pairs:
                out.append((split, label, None, "not in these predictions (evaluated before it was recorded)"))
                continue
            out.append((split, label, paired_difference([x for x, _ in pairs], [y for _, y in pairs]), ""))
    return out


def paired_lines(rows: list[tuple[str, str, dict | None, str]]) -> list[str]:
    """One line per split and metric: n, A, B, the difference with its interval, `*` when beyond noise."""
    lines = []
    for split, label, p, why in rows:
        if p is None:
            lines.append(f"{split:6} {label:20} {why}")
            continue
        lines.append(
            f"{split:6} {label:20} n {p['n']:<4} {p['base']:9.4g} -> {p['tuned']:<9.4g} "
            f"diff {p['diff']:+.4g} (95% CI {p['low']:+.4g} to {p['high']:+.4g})"
            + ("  * beyond noise" if p["beyond_noise"] else "  within noise")
        )
    return lines


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

    a_all = load_predictions(args.predictions, args.a, prompts=True)
    b_all = load_predictions(args.predictions, args.b, prompts=True)
    print(f"\n== tuned model, {args.a} -> {name_b}, paired over the same items (* = beyond noise)")
    print("\n".join(paired_lines(paired(a_all, b_all))))

    a = {k: r for k, r in a_all.items() if k[0] not in PROMPT_SPLITS}
    b = {k: r for k, r in b_all.items() if k[0] not in PROMPT_SPLITS}
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
