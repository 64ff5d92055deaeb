"""Stage `train`: models/base + data/processed -> LoRA/QLoRA/full fine-tuning with LLaMA-Factory -> models/lora.

    dvc repro train              # or: make train
    python src/train.py --params params.yaml --base models/base --data-dir data/processed --out models/lora \
        --checkpoints checkpoints --live-dir dvclive/train --metrics reports/metrics/train.json

Reads `model.trust_remote_code` and `train:`. Writes models/lora/train_config.yaml, which
`llamafactory-cli train models/lora/train_config.yaml` reruns as is, and launches it that way (LLaMA-Factory
starts torchrun and DeepSpeed itself). A rerun resumes from the newest complete checkpoint (src/llmft/train.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmft.common import run_main, stage_parser
from llmft.env import write_environment
from llmft.params import load_params
from llmft.train import TrainPaths, train


def main(argv: list[str] | None = None) -> int:
    d = TrainPaths()
    parser = stage_parser(__doc__, "train")
    parser.add_argument("--base", default=d.model_dir, type=Path, help="output of the model stage")
    parser.add_argument("--data-dir", default=d.data_dir, type=Path, help="output of the prepare stage")
    parser.add_argument("--out", default=d.out, type=Path, help="final adapter (or model) + train_config.yaml")
    parser.add_argument("--checkpoints", default=d.checkpoints, type=Path, help="kept between runs, to resume")
    parser.add_argument("--live-dir", default=d.live_dir, type=Path, help="DVCLive metrics and plots")
    parser.add_argument("--metrics", default=d.metrics, type=Path)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override params.yaml, as `dvc exp run -S` (make train NPROC/NNODES on the nodes DVC does not run on)",
    )
    args = parser.parse_args(argv)
    paths = TrainPaths(args.params, args.base, args.data_dir, args.out, args.checkpoints, args.live_dir, args.metrics)
    outcome = train(load_params(args.params, args.set), paths)
    if outcome.returncode:
        several = outcome.metrics.get("world_size", 1) > 1
        print(
            f"error: llamafactory-cli train exited with code {outcome.returncode}; its messages are above"
            + (
                " (with several processes, the first failure is the cause: the others are stopped after it); "
                "nothing was written to models/lora, and a rerun resumes from the newest complete checkpoint"
                if several
                else ""
            ),
            file=sys.stderr,
        )
        return outcome.returncode
    if outcome.main_node:
        write_environment(args.env, "train")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
