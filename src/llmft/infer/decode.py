"""Greedy decoding of many prompts at once, fast on a CPU, and the teacher-forced loss of answers.

    from llmft.infer.decode import greedy_generate
    answer_ids = greedy_generate(model, [prompt_ids], fmt.stop_ids, fmt.pad_id, max_new_tokens=64)[0]

Why a custom loop instead of `model.generate`: on CPU a decode step streams every weight from memory, so
its cost is mostly fixed per step, and `generate` spends many steps on rows whose answer already ended.
`greedy_generate` keeps the batch full (continuous batching: finished rows are refilled with the next
prompts), computes the prompt prefix shared by all prompts (the template's system prompt) once, multiplies
with MKL-prepacked weights (plain sgemm repacks them at every call: 2.5x slower at 16 rows), writes the
KV cache in place, and runs SDPA's own grouped-query attention instead of copying K/V per head group.
For Llama-family models on CPU in fp32, the decode steps skip HF's forward altogether (fast_decode.py:
fused q/k/v and gate/up weights, no per-step mask or rotary rebuilding); prefill still runs HF's forward.
Answers are the same as greedy `model.generate` (the tests check it); about 3x LLaMA-Factory's
do_predict on a 2-core CPU (perf/perf_eval.py).
"""

from __future__ import annotations

import collections
import contextlib

from llmft.infer.kv_cache import CacheState, SlotLayer
from llmft.infer.mkl import mkl_packed


def _left_pad(batch: list[list[int]], pad_id: int, device):
    import torch

    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def shared_prefix(prompts: list[list[int]]) -> list[int]:
    """The longest token prefix of every prompt, leaving at least one token of each to prefill."""
    length = min(map(len, prompts)) - 1
    for prompt in prompts[1:]:
        length = next((i for i in range(length) if prompt[i] != prompts[0][i]), length)
    return prompts[0][: max(length, 0)]


class _Decoder:
    """Continuous batching over a `SlotLayer` cache: rows that finish are refilled with the next prompts."""

    def __init__(self, model, prompts, stop_ids, pad_id, max_new_tokens, batch_size, full_rows, lean=None):
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import CacheLayerMixin

        CacheLayerMixin.register(SlotLayer)  # a virtual subclass: kv_cache.py imports transformers only when used
        self.model, self.prompts, self.pad_id, self.max_new_tokens = model, prompts, pad_id, max_new_tokens
        self.full_rows, device = full_rows, model.device  # full_rows: decode steps always run batch_size rows
        self.lean = lean  # fast_decode.LeanDecoder for the decode steps, None = the model's own forward
        self.state = CacheState(batch_size=batch_size, capacity=max(map(len, prompts)) + 2 * max_new_tokens)
        self.cache = DynamicCache(config=model.config)
        sliding = any(getattr(layer, "is_sliding", False) for layer in self.cache.layers)
        self.cache.layers = [SlotLayer(self.state) for _ in self.cache.layers]
        self.prefix = [] if sliding else shared_prefix(prompts)  # a sliding window would count the gap after it
        self.stops = torch.tensor(stop_ids, device=device)
        self.answers: list[list[int]] = [[] for _ in prompts]
        self.alive: list[int] = []  # prompt index of each cache row
        self.tokens = torch.zeros(0, dtype=torch.long, device=device)  # last token of each row
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)  # (rows, state.cur) real-token columns
        if self.prefix:  # the template's system prompt, typically: computed once, copied into each new row
            prefix_cache = DynamicCache(config=model.config)
            model(
                input_ids=torch.tensor([self.prefix], device=device),
                past_key_values=prefix_cache,
                use_cache=True,
                logits_to_keep=1,
            )
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
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        state.prefill = False
        self.mask = torch.cat([self.mask, torch.nn.functional.pad(mask, (state.cur - mask.shape[1], 0))])
        self.tokens, self.alive = torch.cat([self.tokens, logits.argmax(-1)]), self.alive + new
        self._record(new, self.tokens[-len(new) :])

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
        if lead >= self.max_new_tokens:  # dropping them keeps state.cur below the capacity (see SlotLayer)
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
            logits = self.model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            ).logits[:n, -1]
        state.cur += 1
        self.tokens = logits.argmax(-1)
        self._record(self.alive, self.tokens)


def greedy_generate(
    model,
    prompts: list[list[int]],
    stop_ids: list[int],
    pad_id: int,
    max_new_tokens: int,
    batch_size: int = 16,
    progress=None,
    use_lean: bool = True,
) -> list[list[int]]:
    """Greedy answers (token ids, ending with the stop token when one was produced) in the order of `prompts`.

    Up to `batch_size` answers are decoded together. When a quarter of them have finished, the next prompts
    (longest first) are prefilled into the freed rows, so the batch stays full until the prompts run out
    (continuous batching). `progress(done, total)` is called each time another `batch_size` answers are done.
    `use_lean=False` runs every decode step through HF's forward even where fast_decode supports the model.
    """
    import torch

    from llmft.infer.fast_decode import LeanDecoder

    if not prompts:
        return []
    queue = collections.deque(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))
    reported = 0
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        lean = LeanDecoder.build(model, batch_size) if use_lean else None
        packed = lean is not None or stack.enter_context(mkl_packed(model, batch_size))
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


def answer_nll(
    model,
    prompts: list[list[int]],
    answers: list[list[int]],
    pad_id: int,
    batch_size: int = 16,
    max_logits: int = 2**28,
    per_example: list[tuple[float, int]] | None = None,
) -> tuple[float, int]:
    """Teacher-forced negative log-likelihood of `answers` given `prompts`: (sum over answer tokens, token count).

    `per_example`, when given a list, receives one (sum, count) per pair, in input order ((0.0, 0) for an empty
    answer): what a paired interval over examples needs (llmft.stats).

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
    items = [(0.0, 0)] * len(prompts)
    with torch.inference_mode():
        for rows in batches:
            ids, mask = _left_pad([prompts[i] + answers[i] for i in rows], pad_id, model.device)
            span = len(answers[rows[0]])  # left padding: every answer ends in the last column
            logits = (
                model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=False,
                    logits_to_keep=span + 1,
                )
                .logits[:, :-1]
                .float()
            )
            targets = ids[:, -span:]
            scored = torch.zeros_like(targets, dtype=torch.bool)
            for row, i in enumerate(rows):
                scored[row, span - len(answers[i]) :] = True
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            total += float(nll[scored].sum())
            count += int(scored.sum())
            for row, i in enumerate(rows):
                items[i] = (float(nll[row][scored[row]].sum()), len(answers[i]))
    if per_example is not None:
        per_example[:] = items
    return total, count
