"""Stage `report`: the pipeline's metrics, predictions and logs -> reports/report.html and reports/report.md.

    dvc repro report             # or: make report (never retrains: DVC reruns only stale stages)
    python src/report.py --params params.yaml --notebook notebooks/report.py

Runs the notebook notebooks/report.py (jupytext percent format, the readable source) with nbclient, with this
script's paths put in a cell after its `parameters` cell, then converts it without code cells: report.html is
one self-contained file (images as base64 PNG, no scripts from a CDN), report.md is for GitHub and PR
comments, its figures in reports/figures/. Inputs are checked first: a missing one names the stage to run.
"""

from __future__ import annotations

import time
from pathlib import Path

from llmft.common import UserError, atomic_path, get_logger, run_main, stage_parser
from llmft.params import load_params
from llmft.report.build import check_inputs, convert, execute, inputs

log = get_logger("report")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, None)
    parser.add_argument("--notebook", default="notebooks/report.py", type=Path, help="jupytext percent-format source")
    parser.add_argument("--prepare", default="reports/metrics/prepare.json", type=Path)
    parser.add_argument("--train", default="reports/metrics/train.json", type=Path)
    parser.add_argument("--eval", default="reports/metrics/eval.json", type=Path)
    parser.add_argument("--export", default="reports/metrics/export.json", type=Path, help="optional")
    parser.add_argument("--rehearse", default="reports/metrics/rehearse.json", type=Path, help="optional")
    parser.add_argument("--benchmark", default="reports/metrics/benchmark.json", type=Path, help="optional")
    parser.add_argument("--predictions", default="reports/predictions.jsonl", type=Path)
    parser.add_argument(
        "--plots", default="dvclive/train/plots/metrics", type=Path, help="the train stage's DVCLive series (*.tsv)"
    )
    parser.add_argument("--data-dir", default="data/processed", type=Path, help="train.json: the length histogram")
    parser.add_argument("--base", default="models/base", type=Path, help="model_info.json and the tokenizer")
    parser.add_argument("--lock", default="dvc.lock", type=Path, help="DVC hashes of data and models")
    parser.add_argument("--train-env", default="reports/env/train.json", type=Path, help="where training ran; optional")
    parser.add_argument("--html", default="reports/report.html", type=Path)
    parser.add_argument("--md", default="reports/report.md", type=Path)
    parser.add_argument("--figures", default="reports/figures", type=Path, help="the md's images; beside --md")
    parser.add_argument("--timeout", default=600, type=int, help="seconds per notebook cell")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    load_params(args.params)  # a bad params.yaml fails here, in one line, before a kernel starts
    if args.figures.parent.resolve() != args.md.parent.resolve():
        raise UserError(f"--figures {args.figures} must sit beside --md {args.md}: report.md links to it relatively")
    check_inputs(args)
    values = {"PARAMS": str(args.params), "EXPORT": str(args.export), "LOCK": str(args.lock)}
    values |= {"ENV": str(args.train_env), "REHEARSE": str(args.rehearse), "BENCHMARK": str(args.benchmark)}
    values |= {name: str(path) for name, (path, _) in inputs(args).items()}
    values |= {"DATA_DIR": str(args.data_dir), "MODEL_DIR": str(args.base)}
    nb = execute(args.notebook, values, args.timeout)
    # Three renames, html last: a crash before it leaves the previous report.html in place.
    with atomic_path(args.html) as html, atomic_path(args.md) as md, atomic_path(args.figures) as figures:
        convert(nb, html, md, figures)
    log.info(
        "wrote %s (%.0f kB), %s and %s/ in %.1f s",
        args.html,
        args.html.stat().st_size / 1024,
        args.md,
        args.figures,
        time.perf_counter() - start,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
