"""Run under torchrun: parse a train_config.yaml with LLaMA-Factory's own parser, as `llamafactory-cli train` does
first, and write (rank 0) the DeepSpeed config transformers resolved from it ("auto" values filled) as JSON.

    torchrun --nproc-per-node 2 tests/deepspeed_args.py train_config.yaml out.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llamafactory.hparams import get_train_args


def main() -> None:
    config, out = sys.argv[1], Path(sys.argv[2])
    sys.argv = [sys.argv[0], config]  # get_train_args reads a YAML path from argv, as the CLI passes it
    _, _, training_args, _, _ = get_train_args()
    if training_args.process_index == 0:
        resolved = training_args.hf_deepspeed_config.config
        result = {"world_size": training_args.world_size, "parallel_mode": str(training_args.parallel_mode)}
        out.write_text(json.dumps(result | {"deepspeed": resolved}, default=str))


if __name__ == "__main__":
    main()
