"""Stage `prepare`: raw table -> cleaned Alpaca (or ShareGPT) train/val[/test] splits for LLaMA-Factory.

Inside the pipeline (reads `prepare:` in params.yaml: one table in prepare.input, or several in prepare.sources):
    dvc repro prepare            # or: make data
The original one-off command still works and ignores params.yaml:
    python src/prepare.py --input your_data.csv --output data/processed_data.json --split
"""

from __future__ import annotations

from pathlib import Path

from llmft.common import get_logger, run_main, stage_parser
from llmft.data.prepare import outside_deps, prepare, write_legacy_outputs, write_pipeline_outputs
from llmft.env import write_environment
from llmft.params import load_params, parse_params

log = get_logger("prepare")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "prepare")
    parser.add_argument("--out", default="data/processed", type=Path)
    parser.add_argument("--metrics", default="reports/metrics/prepare.json", type=Path)
    legacy = parser.add_argument_group("one-off mode (the original prepare.py; params.yaml is not read)")
    legacy.add_argument("--input", help="raw table: .csv .tsv .json .jsonl .parquet .xlsx")
    legacy.add_argument("--output", type=Path, help="e.g. data/processed_data.json")
    legacy.add_argument("--split", action="store_true", help="write <output>_train.json and <output>_val.json")
    legacy.add_argument("--val-size", type=float, default=0.1, help="fraction (<1) or count (>=1) for val")
    legacy.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    if args.input or args.output:
        if not (args.input and args.output):
            parser.error("--input and --output go together")
        val = int(args.val_size) if args.val_size >= 1 and args.val_size.is_integer() else args.val_size
        p = parse_params({"prepare": {"input": args.input, "val_size": val, "seed": args.seed}}, "command line").prepare
        splits, _, _ = prepare(p, do_split=args.split)
        write_legacy_outputs(splits, args.output, args.split)
        return 0

    p = load_params(args.params).prepare
    for path in outside_deps([t.path for t in p.tables()]):
        log.warning(
            "%s is not under data/raw, the prepare stage's DVC dependency: DVC will not rerun it when the "
            "table changes; move it (or `dvc add` it) into data/raw",
            path,
        )
    splits, info, stats = prepare(p)
    write_pipeline_outputs(splits, info, stats, args.out, args.metrics)
    write_environment(args.env, "prepare")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
