"""Stage `benchmark`: standard benchmarks (lm-eval; the HellaSwag subset by default) on the base and tuned models.

    dvc repro benchmark
    python src/benchmark.py --params params.yaml --base models/base --adapter models/prefer \
        --metrics reports/metrics/benchmark.json --samples reports/benchmark/samples.jsonl

Reads `benchmark:` in params.yaml. Both models get the same lm-eval run, offline, on the tasks in
benchmark.include_path (data/benchmarks/tasks; run from the repo root, the tasks' data_files are relative to it).
Writes reports/metrics/benchmark.json (per task base, tuned and delta = tuned - base of acc and its stderr, the
number of questions, chance, whether the delta is within noise, whether the base scores beyond chance (else the task
cannot show a loss) and the paired difference per question; `dvc metrics diff` compares runs) and
reports/benchmark/samples.jsonl (one line per question: prompt, choices, both models' log-likelihoods and answers).
This is the counter-measure of `evaluate`: fine-tuning should not cost general knowledge.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmft.benchmark.run import run_benchmark
from llmft.common import atomic_path, atomic_write_json, get_logger, run_main, stage_parser
from llmft.env import write_environment
from llmft.params import load_params

log = get_logger("benchmark")


def write_samples(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "benchmark")
    parser.add_argument("--base", default="models/base", type=Path, help="directory with model_info.json")
    parser.add_argument("--adapter", default="models/prefer", type=Path, help="the LoRA adapter to benchmark")
    parser.add_argument("--merged", type=Path, help="models/merged: benchmark this as the tuned model instead")
    parser.add_argument("--metrics", default="reports/metrics/benchmark.json", type=Path)
    parser.add_argument("--samples", default="reports/benchmark/samples.jsonl", type=Path)
    args = parser.parse_args(argv)

    p = load_params(args.params).benchmark
    if not p.enabled:
        log.info("benchmark.enabled is false: nothing to run")
        write_samples(args.samples, [])
        atomic_write_json(args.metrics, {"enabled": False})
        write_environment(args.env, "benchmark")
        return 0
    metrics, samples = run_benchmark(p, args.base, args.adapter, args.merged)
    write_samples(args.samples, samples)
    atomic_write_json(args.metrics, metrics)
    write_environment(args.env, "benchmark")
    for task, m in metrics["tasks"].items():
        base, tuned = m["base"], m["tuned"]
        log.info(
            "%s (%d questions, %d-shot, chance %s, base %s): acc %.3f +- %.3f -> %.3f +- %.3f, %s; %d answers changed",
            task,
            m["n"],
            m["num_fewshot"],
            m["chance"],
            "above chance" if m.get("above_chance") else "at chance: a loss would not show",
            base.get("acc", float("nan")),
            base.get("acc_stderr", float("nan")),
            tuned.get("acc", float("nan")),
            tuned.get("acc_stderr", float("nan")),
            "within noise" if m.get("within_noise") else "beyond noise",
            m["changed"],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
