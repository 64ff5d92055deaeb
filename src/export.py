"""Stage `export`: models/base + models/prefer -> models/merged, one plain transformers checkpoint, verified.

    dvc repro export             # or: make export
    python src/export.py --params params.yaml --base models/base --adapter models/prefer --out models/merged \
        --data-dir data/processed --eval reports/metrics/eval.json --metrics reports/metrics/export.json

Reads `export:` and `train:`. Merges, checks the merged model against base + adapter before writing anything,
and reloads what it wrote to check it again (src/llmft/export.py). models/merged/README.md is the model card
(src/llmft/model_card.md).
"""

from __future__ import annotations

from pathlib import Path

from llmft.common import atomic_write_json, get_logger, run_main, stage_parser
from llmft.env import write_environment
from llmft.export import export
from llmft.params import load_params

log = get_logger("export")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "export")
    parser.add_argument("--base", default="models/base")
    parser.add_argument("--adapter", default="models/prefer")
    parser.add_argument("--out", default="models/merged")
    parser.add_argument("--data-dir", default="data/processed", help="its DVC hash goes into the model card")
    parser.add_argument("--eval", default="reports/metrics/eval.json", help="copied into the model card if present")
    parser.add_argument("--metrics", default="reports/metrics/export.json")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    models = Path(args.base), Path(args.adapter), Path(args.out)
    m = export(*models, p.export, p.train, Path(args.data_dir), Path(args.eval))
    atomic_write_json(args.metrics, m)
    write_environment(args.env, "export")
    log.info(
        "wrote %s: %d shard(s), %.1f MB %s, in %.1f s",
        args.out,
        m["num_shards"],
        m["size_mb"],
        m["dtype"],
        m["seconds"],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
