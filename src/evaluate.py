"""Stage `evaluate`: answer every val (and test) prompt with the base and the fine-tuned model; score both.

    dvc repro evaluate           # or: make eval
    python src/evaluate.py --params params.yaml --data-dir data/processed --base models/base \
        --adapter models/prefer --pairs data/pairs --sft models/lora --metrics reports/metrics/eval.json \
        --predictions reports/predictions.jsonl

Reads `evaluate:` in params.yaml, and prepare.variables (they fill the probes' expected answers). Both models get
the same prompts, built by the LLaMA-Factory template the adapter was trained with, and the same greedy decoding.
Writes reports/metrics/eval.json (base, tuned and delta = tuned - base, per split; the probes' pass rates, the share
of answers fine-tuning changed, paired intervals beside each base-vs-tuned difference (`paired`, see
src/llmft/stats.py), and a verdict that warns when the model barely moved or forgot, beyond noise only; `dvc metrics
diff` compares runs; with the prefer stage on, `preference`: how base, SFT and tuned rank the held-out pairs) and
reports/predictions.jsonl (one line per example or probe: split, index, prompt, label, base and tuned answers).
"""

from __future__ import annotations

from pathlib import Path

from llmft.common import atomic_write_json, get_logger, run_main, stage_parser
from llmft.env import write_environment
from llmft.evaluate import evaluate
from llmft.params import load_params
from llmft.predictions import write_predictions

log = get_logger("evaluate")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "evaluate")
    parser.add_argument("--data-dir", default="data/processed", type=Path, help="val.json, test.json, dataset_info")
    parser.add_argument("--base", default="models/base", type=Path, help="directory with model_info.json")
    parser.add_argument("--adapter", default="models/prefer", type=Path, help="the LoRA adapter to evaluate")
    parser.add_argument("--pairs", default="data/pairs", type=Path, help="the prefer stage's pairs (val: held out)")
    parser.add_argument("--sft", default="models/lora", type=Path, help="the SFT adapter, for the pairs' SFT row")
    parser.add_argument("--metrics", default="reports/metrics/eval.json", type=Path)
    parser.add_argument("--predictions", default="reports/predictions.jsonl", type=Path)
    args = parser.parse_args(argv)

    params = load_params(args.params)
    metrics, predictions = evaluate(
        params.evaluate, args.data_dir, args.base, args.adapter, params.prepare.variables, args.pairs, args.sft
    )
    write_predictions(args.predictions, predictions)
    atomic_write_json(args.metrics, metrics)
    write_environment(args.env, "evaluate")
    for s in metrics["examples"]:
        log.info(
            "%s: %s",
            s,
            ", ".join(
                f"{k} {metrics['base'][s][k]:.2f} -> {metrics['tuned'][s][k]:.2f}"
                for k in ("bleu4", "rougeL", "exact_match", "loss")
            ),
        )
    probes, moved = metrics["probes"], metrics["verdict"]
    if probes["tuned"]["total"]:
        log.info(
            "probes passed: base %d/%d, tuned %d/%d",
            probes["base"]["passed"],
            probes["base"]["total"],
            probes["tuned"]["passed"],
            probes["tuned"]["total"],
        )
    if "preference" in metrics:
        pref = metrics["preference"]
        log.info(
            "held-out pairs (%d) ranked right: %s",
            pref["n"],
            ", ".join(f"{name} {pref[name]['accuracy']:.1f}%" for name in ("base", "sft", "tuned") if name in pref),
        )
    log.info("answers changed by fine-tuning: %s", ", ".join(f"{s} {v:g}%" for s, v in metrics["changed"].items()))
    for key in ("warning", "forgot"):
        if moved.get(key):
            log.warning("%s", moved[key])
    if moved.get("noise"):
        log.info("%s", moved["noise"])
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
