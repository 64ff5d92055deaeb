"""Stage `gguf`: models/merged -> models/gguf, GGUF files for llama.cpp and Ollama, each checked against models/merged.

    dvc repro gguf               # or: make gguf
    python src/export_gguf.py --params params.yaml --merged models/merged --out models/gguf \
        --metrics reports/metrics/gguf.json

Reads `gguf:` and `export.check_prompts`. Writes models/gguf/model-<type>.gguf for each gguf.types and an Ollama
Modelfile; the conversion is llama.cpp's convert_hf_to_gguf, installed apart by `make setup` (src/llmft/gguf/).
"""

from __future__ import annotations

from pathlib import Path

from llmft.common import atomic_write_json, get_logger, run_main, stage_parser
from llmft.env import write_environment
from llmft.gguf.run import export_gguf
from llmft.params import load_params

log = get_logger("gguf")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "gguf")
    parser.add_argument("--merged", default="models/merged", help="the export stage's output")
    parser.add_argument("--out", default="models/gguf")
    parser.add_argument("--metrics", default="reports/metrics/gguf.json")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    m = export_gguf(Path(args.merged), Path(args.out), p.gguf, p.export.check_prompts)
    atomic_write_json(args.metrics, m)
    write_environment(args.env, "gguf")
    log.info(
        "wrote %s: %s, in %.1f s",
        args.out,
        ", ".join(f"{f['file']} {f['size_mb']} MB" for f in m["files"].values()),
        m["seconds"],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
