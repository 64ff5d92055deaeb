"""Stage `prefer`: preference tuning (DPO, ORPO, SimPO or KTO) on the SFT adapter -> models/prefer, the adapter
that evaluate, export, benchmark, gguf and the report use.

    dvc repro prefer             # or: make prefer
    python src/prefer.py --params params.yaml --base models/base --adapter models/lora --data-dir data/processed \
        --rehearsal data/rehearsal --pairs data/pairs --out models/prefer --checkpoints checkpoints-prefer \
        --metrics reports/metrics/prefer.json --env reports/env/prefer.json

Reads `prefer:` (method, beta, learning rate, epochs, the pair source, enabled), train's LoRA shape and precision,
and for pairs from the demo's own mistakes (prefer.source: own) rehearse.max_new_tokens/batch_size,
evaluate.dtype/num_threads/cutoff_len/kept.prompts and prepare.variables. It builds data/pairs (held-out val split
included, every dropped pair counted), trains with LLaMA-Factory's own dpo or kto stage, resuming from the newest
complete checkpoint, and writes SFT + preference update as one adapter. With prefer.enabled false (the default)
models/prefer is models/lora as it is, so turning the stage off reruns what follows on the SFT adapter.
docs/preference.md says which method to use when.
"""

from __future__ import annotations

from pathlib import Path

from llmft.common import run_main, stage_parser
from llmft.env import write_environment
from llmft.params import load_params
from llmft.prefer import PreferPaths, pass_through, prefer
from llmft.prefer_pairs import build_pair_data


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "prefer")
    parser.add_argument("--base", default="models/base", type=Path, help="directory with model_info.json")
    parser.add_argument("--adapter", default="models/lora", type=Path, help="the SFT adapter (train's output)")
    parser.add_argument("--data-dir", default="data/processed", type=Path, help="train.json: its identity prompts")
    parser.add_argument("--rehearsal", default="data/rehearsal", type=Path, help="the base model's own answers")
    parser.add_argument("--pairs", default="data/pairs", type=Path, help="written: train/val pairs + dataset_info")
    parser.add_argument("--out", default="models/prefer", type=Path, help="SFT + preference update, one adapter")
    parser.add_argument("--checkpoints", default="checkpoints-prefer", type=Path, help="kept across runs: resume")
    parser.add_argument("--metrics", default="reports/metrics/prefer.json", type=Path)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    paths = PreferPaths(
        params=args.params,
        model_dir=args.base,
        adapter=args.adapter,
        data_dir=args.pairs,
        out=args.out,
        checkpoints=args.checkpoints,
        metrics=args.metrics,
    )
    if not params.prefer.enabled:
        pass_through(paths)
    else:
        built = build_pair_data(
            params.prefer,
            params.rehearse,
            params.evaluate,
            params.prepare.variables,
            args.base,
            args.adapter,
            args.data_dir,
            args.rehearsal,
            args.pairs,
        )
        outcome = prefer(params.prefer, params.train, paths, params.model.trust_remote_code, pairs=built)
        if outcome.returncode:
            return outcome.returncode
    write_environment(args.env, "prefer")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
