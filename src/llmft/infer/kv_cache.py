"""The KV cache of `greedy_generate`: one preallocated slot buffer per layer, written in place.

Depends on transformers internals, pinned at transformers 5.6.0 (requirements.txt); recheck on an upgrade:
- the cache-layer protocol of transformers.cache_utils (CacheLayerMixin: update, get_seq_length,
  get_mask_sizes, get_max_cache_shape, is_sliding, is_compileable, is_initialized, keys/values), which the
  models' attention calls through `past_key_values.layers[i]`;
- `DynamicCache(config=...)` building one layer object per decoder layer in `.layers` (replaced here);
- the masking utilities reading `get_mask_sizes` to size the attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CacheState:
    """What every layer's cache shares with the decoder: where to write, and for which rows."""

    batch_size: int  # rows in the buffers
    capacity: int  # columns in the buffers
    cur: int = 0  # the shared write column of the decode step
    rows: tuple[int, int] = (0, 0)  # [first, last) rows the next forward pass covers
    prefill: bool = False  # the next forward pass prefills new rows (else: one decode step)
    prefix_len: int = 0  # tokens of the shared prompt prefix, computed once


class SlotLayer:
    """One layer's KV cache for `greedy_generate`: (rows, heads, columns, dim) buffers, written in place.

    A row's tokens end at the shared write column `state.cur`; columns left of its first token are masked.
    A decode step writes column `cur` for all rows. A prefill of new rows writes the prompt prefix shared
    by all prompts (computed once) and then their left-padded suffixes, into the columns before `cur`. They
    always fit: prompts are decoded longest first, so no new prompt is longer than a row in the cache.
    """

    is_sliding, is_compileable = False, False

    def __init__(self, state: CacheState):
        self.state, self.buffers, self.keys, self.values, self.prefix = state, None, None, None, None
        self.is_initialized = False

    def update(self, key_states, value_states, *args, **kwargs):
        st = self.state
        if self.buffers is None:
            self.buffers = [
                s.new_zeros((st.batch_size, s.shape[1], st.capacity, s.shape[-1])) for s in (key_states, value_states)
            ]
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        first, last = st.rows
        start = st.cur - key_states.shape[-2] if st.prefill else st.cur
        for i, (buffer, states) in enumerate(zip(self.buffers, (key_states, value_states))):
            buffer[first:last, :, start : start + states.shape[-2]] = states
            if st.prefill and self.prefix:
                buffer[first:last, :, start - st.prefix_len : start] = self.prefix[i]
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
            buffer[: len(rows), :, :cur] = buffer[rows, :, :cur]

    def drop_columns(self, lead: int, cur: int) -> None:
        for buffer in self.buffers or ():
            buffer[:, :, : cur - lead] = buffer[:, :, lead:cur].clone()
