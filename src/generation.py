"""Load base + LoRA adapter, format prompts as LLaMA-Factory trained them, and decode greedily, fast.

Shared by the stages that run the fine-tuned model (evaluate; chat, serve and export reuse it):

    from generation import load_chat_format, load_model, merge_adapter, greedy_generate
    fmt = load_chat_format("models/base")                 # tokenizer + LLaMA-Factory template
    model = merge_adapter(load_model(fmt), "models/lora")  # LoRA folded into the weights: no per-layer overhead
    prompt_ids, _ = fmt.encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}])
    answer_ids = greedy_generate(model, [prompt_ids], fmt.stop_ids, fmt.pad_id, max_new_tokens=64)[0]

Why a custom loop instead of `model.generate` (which keeps every row of a batch running until the longest
answer ends): it sorts prompts by length (little left padding), computes logits for the last position only,
drops finished rows from the batch and the KV cache (late steps run on the few answers still going), writes
the KV cache in place instead of torch.cat-ing it every step, and on CPU runs SDPA's own grouped-query
attention instead of copying K/V per head group. Answers match greedy `model.generate` (tests check it).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import UserError


@dataclass
class ChatFormat:
    """The tokenizer plus the LLaMA-Factory template the adapter was trained with."""

    tokenizer: Any
    template: Any  # llamafactory.data.template.Template
    data_args: Any  # llamafactory.hparams.DataArguments (template, cutoff_len)
    path: str  # where the base weights load from
    trust_remote_code: bool = False

    @property
    def stop_ids(self) -> list[int]:
        return sorted(self.template.get_stop_token_ids(self.tokenizer))

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode(self, messages: list[dict], system: str | None = None, tools: str | None = None):
        """(prompt_ids, answer_ids) exactly as LLaMA-Factory's do_predict builds them.

        `messages` alternate user/assistant and end with the assistant turn to predict (its content may be "").
        Long examples are cut to `cutoff_len` by LLaMA-Factory's own rule (infer_seqlen).
        """
        from llamafactory.data.processor.processor_utils import infer_seqlen

        prompt_ids, answer_ids = self.template.encode_oneturn(self.tokenizer, messages, system or None, tools or None)
        if self.template.efficient_eos:
            answer_ids = answer_ids + [self.tokenizer.eos_token_id]
        keep_prompt, keep_answer = infer_seqlen(len(prompt_ids), len(answer_ids), self.data_args.cutoff_len)
        return prompt_ids[:keep_prompt], answer_ids[:keep_answer]


def read_model_info(base_dir: str | Path) -> dict:
    """models/base/model_info.json, with `path` resolved (missing = the directory itself)."""
    info_file = Path(base_dir) / "model_info.json"
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{info_file}: not found; run `dvc repro model` (python src/prepare_model.py) first") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{info_file}: not valid JSON ({err}); rerun `dvc repro model`") from None
    if not info.get("template"):
        raise UserError(f"{info_file}: no 'template' key; rerun `dvc repro model`")
    info["path"] = info.get("path") or str(base_dir)
    return info


def load_chat_format(base_dir: str | Path, cutoff_len: int = 2048) -> ChatFormat:
    """Tokenizer + LLaMA-Factory template of models/base; UserError when the tokenizer has no chat template."""
    from transformers import AutoTokenizer

    info = read_model_info(base_dir)
    trust = bool(info.get("params", {}).get("trust_remote_code", False))
    try:
        tokenizer = AutoTokenizer.from_pretrained(info["path"], trust_remote_code=trust)
    except (OSError, ValueError) as err:
        raise UserError(f"{base_dir}: cannot load the tokenizer from {info['path']}: "
                        f"{str(err).strip().splitlines()[0]}") from None
    if not tokenizer.chat_template:
        raise UserError(f"{info['path']}: the tokenizer has no chat template, so chat prompts are undefined; "
                        "use a chat/instruct model or add chat_template to its tokenizer_config.json")
    from llamafactory.data.template import TEMPLATES, get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    if info["template"] not in TEMPLATES:
        raise UserError(f"{base_dir}/model_info.json: template {info['template']!r} is not a LLaMA-Factory "
                        "template; rerun `dvc repro model` or fix model.template")
    data_args = DataArguments(template=info["template"], cutoff_len=cutoff_len)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    tokenizer.padding_side = "left"
    return ChatFormat(tokenizer, template, data_args, info["path"], trust)


def resolve_dtype(dtype: str, device: str):
    """auto = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU (CPU half math is slow and lossy)."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings counted once)."""
    try:
        cpus = os.sched_getaffinity(0)
        return len({Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
                    for c in cpus}) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(num_threads: int = 0) -> int:
    """Use `num_threads` intra-op threads (0 = physical cores: extra hyperthreads only slow matmuls down)."""
    import torch

    n = num_threads or physical_cores()
    torch.set_num_threads(n)
    return n


def _sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **_):
    """HF's "sdpa" attention, but with SDPA's own grouped-query attention under a padding mask too.

    HF's version copies K and V num_key_value_groups times whenever there is a mask (CUDA kernels would fall
    back to slow math otherwise); on CPU that copy costs several times the attention itself. Same results.
    """
    import torch

    is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, is_causal=is_causal,
                                                           enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def load_model(fmt: ChatFormat, dtype: str = "auto", device: str = "auto"):
    """The base model in eval mode on `device` (auto = CUDA if available, else CPU)."""
    import torch
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        model = AutoModelForCausalLM.from_pretrained(fmt.path, dtype=resolve_dtype(dtype, device),
                                                     trust_remote_code=fmt.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load base weights from {fmt.path}: {str(err).strip().splitlines()[0]}") from None
    if device == "cpu" and model.config._attn_implementation == "sdpa":
        AttentionInterface.register("sdpa_gqa", _sdpa_gqa)
        AttentionMaskInterface.register("sdpa_gqa", sdpa_mask)
        model.set_attn_implementation("sdpa_gqa")
    return model.to(device).eval()


def check_adapter(adapter_dir: str | Path) -> Path:
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir}: no LoRA adapter here (adapter_config.json missing); "
                        "run `dvc repro train` (python src/train.py) first")
    return adapter_dir


def merge_adapter(model, adapter_dir: str | Path):
    """Fold the LoRA adapter into the weights in memory; the result runs at base-model speed."""
    from peft import PeftModel

    adapter_dir = check_adapter(adapter_dir)
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"{adapter_dir}: the adapter does not fit the base model "
                        f"({str(err).strip().splitlines()[0][:300]}); retrain it on this base") from None
    return merged.eval()


def _left_pad(batch: list[list[int]], pad_id: int, device):
    import torch

    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def _kv_cache(model, capacity: int):
    """A DynamicCache whose layers write into buffers sized once for prompt + answer.

    The stock layers torch.cat the whole cache at every step, ~15% of a CPU decode step at batch 16.
    Models with sliding-window or other special layers keep the stock cache.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class Preallocated(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.dtype, self.device, self.length = key_states.dtype, key_states.device, 0
                self.buffers = [s.new_empty((*s.shape[:2], capacity, s.shape[-1])) for s in (key_states, value_states)]
                self.is_initialized = True
            end = self.length + key_states.shape[-2]
            for buffer, states in zip(self.buffers, (key_states, value_states)):
                buffer[:, :, self.length:end] = states
            self.length = end
            self.keys, self.values = (buffer[:, :, :end] for buffer in self.buffers)
            return self.keys, self.values

        def batch_select_indices(self, indices):
            self.buffers = [buffer[indices] for buffer in self.buffers]
            self.keys, self.values = (buffer[:, :, :self.length] for buffer in self.buffers)

    cache = DynamicCache(config=model.config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [Preallocated() for _ in cache.layers]
    return cache


def _greedy_batch(model, batch: list[list[int]], stop_ids: list[int], pad_id: int, max_new_tokens: int):
    import torch

    device = model.device
    ids, mask = _left_pad(batch, pad_id, device)
    stops = torch.tensor(stop_ids, device=device)
    cache = _kv_cache(model, ids.shape[1] + max_new_tokens)
    alive = list(range(len(batch)))  # original row of each row still in the batch
    answers: list[list[int]] = [[] for _ in batch]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1)
        for row, token in zip(alive, tokens.tolist()):
            answers[row].append(token)
        done = torch.isin(tokens, stops)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):  # finished answers leave the batch, so later steps cost less
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive = [alive[i] for i in keep.tolist()]
            tokens, mask = tokens[keep], mask[keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                       past_key_values=cache, use_cache=True).logits[:, -1]
    return answers


def greedy_generate(model, prompts: list[list[int]], stop_ids: list[int], pad_id: int, max_new_tokens: int,
                    batch_size: int = 16, progress=None) -> list[list[int]]:
    """Greedy answers (token ids, ending with the stop token when one was produced) in the order of `prompts`.

    Batches are built from prompts sorted by length, longest first (an OOM shows up at once, not at the end).
    `progress(done, total)` is called after each batch.
    """
    import torch

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            for row, answer in zip(rows, _greedy_batch(model, [prompts[i] for i in rows], stop_ids, pad_id,
                                                       max_new_tokens)):
                answers[row] = answer
            if progress:
                progress(min(start + batch_size, len(order)), len(order))
    return answers


def answer_nll(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int,
               batch_size: int = 16, max_logits: int = 2**28) -> tuple[float, int]:
    """Teacher-forced negative log-likelihood of `answers` given `prompts`: (sum over answer tokens, token count).

    Only the answer tokens are scored (the prompt is context), as in LLaMA-Factory's SFT loss. A batch holds
    at most `max_logits` logits (1 GiB in fp32), so long answers with a big vocabulary use smaller batches.
    """
    import torch

    vocab = model.get_output_embeddings().weight.shape[0]
    order = sorted((i for i in range(len(prompts)) if answers[i]), key=lambda i: (-len(answers[i]), -len(prompts[i])))
    batches: list[list[int]] = []
    for i in order:  # longest answers first, so the first row of a batch sets its span
        rows = batches[-1] if batches else []
        if rows and len(rows) < batch_size and (len(rows) + 1) * len(answers[rows[0]]) * vocab <= max_logits:
            rows.append(i)
        else:
            batches.append([i])
    total, count = 0.0, 0
    with torch.inference_mode():
        for rows in batches:
            ids, mask = _left_pad([prompts[i] + answers[i] for i in rows], pad_id, model.device)
            span = len(answers[rows[0]])  # left padding: every answer ends in the last column
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                           use_cache=False, logits_to_keep=span + 1).logits[:, :-1].float()
            targets = ids[:, -span:]
            scored = torch.zeros_like(targets, dtype=torch.bool)
            for row, i in enumerate(rows):
                scored[row, span - len(answers[i]):] = True
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            total += float(nll[scored].sum())
            count += int(scored.sum())
    return total, count


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise UserError("eval.backend=vllm but vllm is not installed; `pip install vllm` on a CUDA machine, "
                        "or set eval.backend: hf")


def vllm_generate(fmt: ChatFormat, adapter_dir: str | Path, prompts: list[list[int]],
                  max_new_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy (base, tuned) answers from one vLLM engine, the adapter applied per request.

    Optional GPU backend (eval.backend: vllm). Not covered by the tests: vLLM needs CUDA.
    """
    require_vllm()
    import gc

    import torch
    from vllm import LLM, SamplingParams

    gc.collect()  # vLLM sizes its KV cache from the free GPU memory: release what the HF loss pass held
    torch.cuda.empty_cache()
    from vllm.lora.request import LoRARequest

    rank = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"]
    llm = LLM(model=fmt.path, enable_lora=True, max_lora_rank=max(8, 2 ** math.ceil(math.log2(rank))),
              trust_remote_code=fmt.trust_remote_code)
    sampling = SamplingParams(temperature=0, max_tokens=max_new_tokens, stop_token_ids=fmt.stop_ids,
                              skip_special_tokens=False)
    requests = [{"prompt_token_ids": ids} for ids in prompts]
    base = llm.generate(requests, sampling)
    tuned = llm.generate(requests, sampling, lora_request=LoRARequest("adapter", 1, str(adapter_dir)))
    return [list(o.outputs[0].token_ids) for o in base], [list(o.outputs[0].token_ids) for o in tuned]
