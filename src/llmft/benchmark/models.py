"""The two models lm-eval scores, base then tuned: on transformers (the adapter folded in) or on one vLLM engine."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

from llmft.benchmark.tasks import first_line
from llmft.common import UserError, get_logger
from llmft.infer.loading import merge_adapter, resolve_dtype, set_threads
from llmft.model import read_model_info
from llmft.params import BenchmarkParams

log = get_logger("benchmark")


def lm_models(p: BenchmarkParams, base_dir: Path, adapter_dir: Path, merged_dir: Path | None) -> Iterator:
    """("base", lm) then ("tuned", lm) on benchmark.backend; each model loads when its turn comes."""
    if p.backend == "vllm":
        if merged_dir:
            log.info("backend vllm: the tuned model is the base with the adapter per request; %s unused", merged_dir)
        return vllm_models(base_dir, adapter_dir, p.batch_size)
    return hf_models(base_dir, adapter_dir, merged_dir, p.batch_size)


def hf_models(base_dir: Path, adapter_dir: Path, merged_dir: Path | None, batch_size: int) -> Iterator:
    """("base", lm) then ("tuned", lm): lm-eval HFLMs on one set of weights, the adapter folded in between.

    Folded, the tuned model runs at base speed; lm-eval's own peft= keeps LoRA unmerged (~1.6x slower on CPU).
    """
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = read_model_info(base_dir)
    trust = bool(info.get("params", {}).get("trust_remote_code", False))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        set_threads()

    def load(path: str):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=resolve_dtype("auto", device), trust_remote_code=trust
            )
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load model weights from {path}: {first_line(err)}") from None
        return model.to(device).eval()

    tokenizer = AutoTokenizer.from_pretrained(info["path"], trust_remote_code=trust)  # both models: same tokens
    model = load(info["path"])
    yield "base", HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    model = load(str(merged_dir)) if merged_dir else merge_adapter(model, adapter_dir)
    yield "tuned", HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def vllm_models(base_dir: Path, adapter_dir: Path, batch_size: int) -> Iterator:
    """("base", lm) then ("tuned", lm) from one vLLM engine, the adapter applied per request (not with --merged).

    Optional GPU backend (benchmark.backend: vllm). Not covered by the tests: vLLM needs CUDA.
    """
    from lm_eval.models.vllm_causallms import VLLM

    info = read_model_info(base_dir)
    rank = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))["r"]
    lm = VLLM(
        pretrained=info["path"],
        lora_local_path=str(adapter_dir),
        max_lora_rank=max(8, 2 ** math.ceil(math.log2(rank))),
        batch_size=batch_size,
        trust_remote_code=bool(info.get("params", {}).get("trust_remote_code", False)),
    )
    lora, lm.lora_request = lm.lora_request, None
    yield "base", lm
    lm.lora_request = lora
    yield "tuned", lm
