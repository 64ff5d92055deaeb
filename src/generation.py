"""Load base + LoRA adapter, format prompts as LLaMA-Factory trained them, and decode greedily, fast.

Shared by the stages that run the fine-tuned model (evaluate; chat, serve and export reuse it):

    from generation import load_chat_format, load_model, merge_adapter, greedy_generate
    fmt = load_chat_format("models/base")                 # tokenizer + LLaMA-Factory template
    model = merge_adapter(load_model(fmt), "models/lora")  # LoRA folded into the weights: no per-layer overhead
    prompt_ids, _ = fmt.encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}])
    answer_ids = greedy_generate(model, [prompt_ids], fmt.stop_ids, fmt.pad_id, max_new_tokens=64)[0]

Why a custom loop instead of `model.generate`: on CPU a decode step streams every weight from memory, so
its cost is mostly fixed per step, and `generate` spends many steps on rows whose answer already ended.
`greedy_generate` keeps the batch full (continuous batching: finished rows are refilled with the next
prompts), computes the prompt prefix shared by all prompts (the template's system prompt) once, multiplies
with MKL-prepacked weights (plain sgemm repacks them at every call: 2.5x slower at 16 rows), writes the
KV cache in place, and runs SDPA's own grouped-query attention instead of copying K/V per head group.
For Llama-family models on CPU in fp32, the decode steps skip HF's forward altogether (src/fast_decode.py:
fused q/k/v and gate/up weights, no per-step mask or rotary rebuilding); prefill still runs HF's forward.
Answers are the same as greedy `model.generate` (the tests check it); about 3x LLaMA-Factory's
do_predict on a 2-core CPU (benchmarks/bench_eval.py).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import json
import math
import os
import types
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


class _SlotLayer:
    """One layer's KV cache for `greedy_generate`: (rows, heads, columns, dim) buffers, written in place.

    A row's tokens end at the shared write column `state.cur`; columns left of its first token are masked.
    A decode step writes column `cur` for all rows. A prefill of new rows writes the prompt prefix shared
    by all prompts (computed once) and then their left-padded suffixes, into the columns before `cur`. They
    always fit: prompts are decoded longest first, so no new prompt is longer than a row in the cache.
    """

    is_sliding, is_compileable = False, False

    def __init__(self, state):
        self.state, self.buffers, self.keys, self.values, self.prefix = state, None, None, None, None
        self.is_initialized = False

    def update(self, key_states, value_states, *args, **kwargs):
        st = self.state
        if self.buffers is None:
            self.buffers = [s.new_zeros((st.batch_size, s.shape[1], st.capacity, s.shape[-1]))
                            for s in (key_states, value_states)]
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        first, last = st.rows
        start = st.cur - key_states.shape[-2] if st.prefill else st.cur
        for i, (buffer, states) in enumerate(zip(self.buffers, (key_states, value_states))):
            buffer[first:last, :, start:start + states.shape[-2]] = states
            if st.prefill and self.prefix:
                buffer[first:last, :, start - st.prefix_len:start] = self.prefix[i]
        lo, hi = (start - st.prefix_len, st.cur) if st.prefill else (0, st.cur + 1)
        self.keys, self.values = (buffer[first:last, :, lo:hi] for buffer in self.buffers)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.state.prefix_len if self.state.prefill else self.state.cur

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_cache_shape(self) -> int:
        return -1

    def keep_rows(self, rows, cur: int) -> None:
        for buffer in self.buffers or ():
            buffer[:len(rows), :, :cur] = buffer[rows, :, :cur]

    def drop_columns(self, lead: int, cur: int) -> None:
        for buffer in self.buffers or ():
            buffer[:, :, :cur - lead] = buffer[:, :, lead:cur].clone()


def shared_prefix(prompts: list[list[int]]) -> list[int]:
    """The longest token prefix of every prompt, leaving at least one token of each to prefill."""
    length = min(map(len, prompts)) - 1
    for prompt in prompts[1:]:
        length = next((i for i in range(length) if prompt[i] != prompts[0][i]), length)
    return prompts[0][:max(length, 0)]


@contextlib.contextmanager
def _mkl_packed(model, rows: int):
    """On CPU in fp32, let every nn.Linear multiply inputs of exactly `rows` rows with MKL-prepacked weights.

    Plain sgemm repacks the weight matrix at every call; for the few rows of a decode step that costs more
    than the multiplication (measured: 2.5x slower at 16 rows). Results differ only by float rounding (sums
    in another order, ~1e-6 relative). The packed copies double the weights' memory while decoding, so a
    model that would not fit twice is left alone.
    Yields whether the weights were packed.
    """
    import torch

    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    try:  # MemAvailable counts the page cache the kernel can drop; 0 where unknown (then nothing is packed)
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        free = 1024 * int(next(line.split()[1] for line in meminfo if line.startswith("MemAvailable")))
    except (OSError, StopIteration, ValueError):
        free = 0
    if model.device.type != "cpu" or model.dtype != torch.float32 or not torch.backends.mkl.is_available() \
            or 1.5 * size > free:
        yield False
        return

    def packed_forward(linear, packed, x):
        if x.numel() != rows * x.shape[-1]:
            return torch.nn.functional.linear(x, linear.weight, linear.bias)
        return torch.ops.mkl._mkl_linear(x, packed, linear.weight, linear.bias, rows)

    for linear in linears:
        linear.forward = functools.partial(packed_forward, linear,
                                           torch.ops.mkl._mkl_reorder_linear_weight(linear.weight, rows))
    try:
        yield True
    finally:
        for linear in linears:
            del linear.forward  # back to nn.Linear.forward (weights may change, e.g. when an adapter is merged)


class _Decoder:
    """Continuous batching over a `_SlotLayer` cache: rows that finish are refilled with the next prompts."""

    def __init__(self, model, prompts, stop_ids, pad_id, max_new_tokens, batch_size, full_rows, lean=None):
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import CacheLayerMixin

        CacheLayerMixin.register(_SlotLayer)  # a virtual subclass: this module imports transformers only when used
        self.model, self.prompts, self.pad_id, self.max_new_tokens = model, prompts, pad_id, max_new_tokens
        self.full_rows, device = full_rows, model.device  # full_rows: decode steps always run batch_size rows
        self.lean = lean  # fast_decode.LeanDecoder for the decode steps, None = the model's own forward
        self.state = types.SimpleNamespace(batch_size=batch_size, cur=0, rows=(0, 0), prefill=False, prefix_len=0,
                                           capacity=max(map(len, prompts)) + 2 * max_new_tokens)
        self.cache = DynamicCache(config=model.config)
        sliding = any(getattr(layer, "is_sliding", False) for layer in self.cache.layers)
        self.cache.layers = [_SlotLayer(self.state) for _ in self.cache.layers]
        self.prefix = [] if sliding else shared_prefix(prompts)  # a sliding window would count the gap after it
        self.stops = torch.tensor(stop_ids, device=device)
        self.answers: list[list[int]] = [[] for _ in prompts]
        self.alive: list[int] = []  # prompt index of each cache row
        self.tokens = torch.zeros(0, dtype=torch.long, device=device)  # last token of each row
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)  # (rows, state.cur) real-token columns
        if self.prefix:  # the template's system prompt, typically: computed once, copied into each new row
            prefix_cache = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([self.prefix], device=device), past_key_values=prefix_cache,
                  use_cache=True, logits_to_keep=1)
            for layer, computed in zip(self.cache.layers, prefix_cache.layers):
                layer.prefix = (computed.keys, computed.values)
            self.state.prefix_len = len(self.prefix)

    def _record(self, rows: list[int], tokens) -> None:
        for row, token in zip(rows, tokens.tolist()):
            self.answers[row].append(token)

    def refill(self, new: list[int]) -> None:
        """Prefill the prompts `new` into the rows after the live ones; record their first tokens."""
        import torch

        state, skip = self.state, len(self.prefix)
        ids, mask = _left_pad([self.prompts[i][skip:] for i in new], self.pad_id, self.model.device)
        mask = torch.cat([mask.new_ones((len(new), skip)), mask], dim=1)
        if not self.alive:
            state.cur, self.mask = mask.shape[1], self.mask.new_zeros((0, mask.shape[1]))
        state.prefill, state.rows = True, (len(self.alive), len(self.alive) + len(new))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, skip:]
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        state.prefill = False
        self.mask = torch.cat([self.mask, torch.nn.functional.pad(mask, (state.cur - mask.shape[1], 0))])
        self.tokens, self.alive = torch.cat([self.tokens, logits.argmax(-1)]), self.alive + new
        self._record(new, self.tokens[-len(new):])

    def prune(self) -> None:
        """Drop the rows whose answer is complete (stop token or max_new_tokens) from the batch and the cache."""
        import torch

        lengths = torch.tensor([len(self.answers[row]) for row in self.alive], device=self.model.device)
        finished = torch.isin(self.tokens, self.stops) | (lengths >= self.max_new_tokens)
        if bool(finished.any()):
            keep = (~finished).nonzero().squeeze(1)
            for layer in self.cache.layers:
                layer.keep_rows(keep, self.state.cur)
            self.alive = [self.alive[i] for i in keep.tolist()]
            self.tokens, self.mask = self.tokens[keep], self.mask[keep]

    def step(self) -> None:
        """One token for every live row."""
        import torch

        state, n = self.state, len(self.alive)
        lead = int(self.mask.any(0).int().argmax())  # columns left of every row's first token are dead
        if lead >= self.max_new_tokens:  # dropping them keeps state.cur below the capacity (see _SlotLayer)
            for layer in self.cache.layers:
                layer.drop_columns(lead, state.cur)
            self.mask, state.cur = self.mask[:, lead:], state.cur - lead
        self.mask = torch.cat([self.mask, self.mask.new_ones((n, 1))], dim=1)
        tokens, mask = self.tokens[:, None], self.mask
        if self.full_rows and n < state.batch_size:  # idle rows see only themselves; their output is unused
            idle = torch.nn.functional.pad(mask.new_ones((state.batch_size - n, 1)), (mask.shape[1] - 1, 0))
            tokens = torch.nn.functional.pad(tokens, (0, 0, 0, state.batch_size - n), value=self.pad_id)
            mask = torch.cat([mask, idle])
        state.rows, positions = (0, len(mask)), mask.sum(-1, keepdim=True) - 1
        if self.lean:
            logits = self.lean.step(tokens[:, 0], mask.bool(), positions[:, 0], self.cache.layers, state.cur)[:n]
        else:
            logits = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                                past_key_values=self.cache, use_cache=True).logits[:n, -1]
        state.cur += 1
        self.tokens = logits.argmax(-1)
        self._record(self.alive, self.tokens)


def greedy_generate(model, prompts: list[list[int]], stop_ids: list[int], pad_id: int, max_new_tokens: int,
                    batch_size: int = 16, progress=None, use_lean: bool = True) -> list[list[int]]:
    """Greedy answers (token ids, ending with the stop token when one was produced) in the order of `prompts`.

    Up to `batch_size` answers are decoded together. When a quarter of them have finished, the next prompts
    (longest first) are prefilled into the freed rows, so the batch stays full until the prompts run out
    (continuous batching). `progress(done, total)` is called each time another `batch_size` answers are done.
    `use_lean=False` runs every decode step through HF's forward even where fast_decode supports the model.
    """
    import torch

    from fast_decode import LeanDecoder

    if not prompts:
        return []
    queue = collections.deque(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))
    reported = 0
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        lean = LeanDecoder.build(model, batch_size) if use_lean else None
        packed = lean is not None or stack.enter_context(_mkl_packed(model, batch_size))
        decoder = _Decoder(model, prompts, stop_ids, pad_id, max_new_tokens, batch_size, full_rows=packed, lean=lean)
        while queue or decoder.alive:
            free = batch_size - len(decoder.alive)
            if queue and free >= min(max(1, batch_size // 4), len(queue)):
                decoder.refill([queue.popleft() for _ in range(min(free, len(queue)))])
            decoder.prune()
            done = len(prompts) - len(queue) - len(decoder.alive)
            if progress and done > reported and (done // batch_size > reported // batch_size or done == len(prompts)):
                progress(done, len(prompts))
                reported = done
            if decoder.alive:
                decoder.step()
    return decoder.answers


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
