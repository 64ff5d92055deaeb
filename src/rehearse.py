"""Stage `rehearse`: the base model answers general prompts (rehearse.prompts) -> data/rehearsal, mixed into training.

    dvc repro rehearse           # or: make rehearse
    python src/rehearse.py --params params.yaml --base models/base --out data/rehearsal \
        --metrics reports/metrics/rehearse.json

Reads `rehearse:` (which prompts, how many, how long an answer may be),
evaluate.backend/dtype/num_threads/cutoff_len (the same decoder as evaluate: vLLM on a GPU where evaluate.backend is
vllm), evaluate.kept.prompts (the held-out everyday set, which must share no prompt with the rehearsal list) and
prepare.variables (an answer naming the persona is dropped). Writes data/rehearsal/rehearsal.json (Alpaca rows: the
prompt and the base model's own greedy answer) with its dataset_info.json, and reports/metrics/rehearse.json
(prompts, kept, dropped by reason, tokens/s). With rehearse.enabled false it writes an empty set without loading the
model. DVC reruns it only when the base model, the prompt files or these params change; rehearse.share is the train
stage's (how much of it each step holds).
"""

from __future__ import annotations

from pathlib import Path

from llmft.common import run_main, stage_parser
from llmft.env import write_environment
from llmft.params import load_params
from llmft.rehearse import rehearse, write_rehearsal


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "rehearse")
    parser.add_argument("--base", default="models/base", type=Path, help="directory with model_info.json")
    parser.add_argument("--out", default="data/rehearsal", type=Path, help="rehearsal.json + dataset_info.json")
    parser.add_argument("--metrics", default="reports/metrics/rehearse.json", type=Path)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    rows, stats = rehearse(params.rehearse, args.base, params.evaluate, params.prepare.variables)
    write_rehearsal(rows, stats, args.out, args.metrics)
    write_environment(args.env, "rehearse")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
