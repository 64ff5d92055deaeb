"""Optional GPU generation backend (evaluate.backend: vllm)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from llmft.common import UserError
from llmft.infer.chat_format import ChatFormat


def require_vllm(key: str = "evaluate.backend") -> None:
    """UserError naming the params key that asked for vLLM when it is not installed."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError(f"{key}=vllm but vllm is not installed; `pip install vllm` on a CUDA machine, or set {key}: hf")


def vllm_generate(
    fmt: ChatFormat, adapter_dir: str | Path | None, prompts: list[list[int]], max_new_tokens: int
) -> tuple[list[list[int]], list[list[int]] | None]:
    """Greedy (base, tuned) answers from one vLLM engine, the adapter applied per request; tuned is None when
    there is no adapter (the rehearse stage's base-only answers).

    Optional GPU backend (evaluate.backend: vllm). Not covered by the tests: vLLM needs CUDA.
    """
    require_vllm()
    import gc

    import torch
    from vllm import LLM, SamplingParams

    gc.collect()  # vLLM sizes its KV cache from the free GPU memory: release what the HF loss pass held
    torch.cuda.empty_cache()
    from vllm.lora.request import LoRARequest

    lora = {}
    if adapter_dir is not None:
        rank = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"]
        lora = {"enable_lora": True, "max_lora_rank": max(8, 2 ** math.ceil(math.log2(rank)))}
    llm = LLM(model=fmt.path, trust_remote_code=fmt.trust_remote_code, **lora)
    sampling = SamplingParams(
        temperature=0, max_tokens=max_new_tokens, stop_token_ids=fmt.stop_ids, skip_special_tokens=False
    )
    requests = [{"prompt_token_ids": ids} for ids in prompts]
    base = [list(o.outputs[0].token_ids) for o in llm.generate(requests, sampling)]
    if adapter_dir is None:
        return base, None
    tuned = llm.generate(requests, sampling, lora_request=LoRARequest("adapter", 1, str(adapter_dir)))
    return base, [list(o.outputs[0].token_ids) for o in tuned]
