"""The memory model (src/llmft/lf/memory.py): its documented formula, and a known figure for Llama-2-7B."""

from __future__ import annotations

import pytest

from lf_configs import LLAMA_7B
from llmft.lf import memory


def test_memory_estimate_follows_its_documented_formula():
    cfg = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "vocab_size": 1000,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "dtype": "float32",
    }
    est = memory.estimate_peak_gib(
        cfg, 4_000_000, finetuning_type="lora", lora_rank=8, quantization_bit=None, precision="fp32", batch=4, seq=32
    )
    gib = 2**30
    assert est["weights"] == pytest.approx(1_000_000 * 4 / gib)
    assert est["optimizer"] == pytest.approx(16 * 8 * 2 * (9 * 64 + 2 * 32 + 3 * 128) / gib)
    h, kv, i, b, tokens = 64, 32, 128, 4, 4 * 32  # fp32: 4-byte activations
    layer = 2 * 5 * b * h + b * (6 * h + 3 * kv) + b * (h + 4 * i)  # RMSNorms + attention + SwiGLU, no dropout
    assert est["activations"] == pytest.approx(tokens * (2 * b * h + layer) / gib)  # checkpointed: inputs + 1 layer
    assert est["logits"] == pytest.approx(12 * tokens * 1000 / gib)
    full = memory.estimate_peak_gib(
        cfg,
        4_000_000,
        finetuning_type="lora",
        lora_rank=8,
        quantization_bit=None,
        precision="fp32",
        batch=4,
        seq=32,
        grad_checkpointing=False,
    )
    assert full["activations"] == pytest.approx(tokens * 2 * layer / gib)  # every layer keeps all of its own
    assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"))
    qlora = memory.estimate_peak_gib(
        cfg, 4_000_000, finetuning_type="lora", lora_rank=8, quantization_bit=4, precision="bf16", batch=4, seq=32
    )
    assert qlora["weights"] == pytest.approx(est["weights"] / 8)


def test_activation_estimate_for_llama_7b_lora():
    gib = memory.activation_gib(LLAMA_7B, 2048, precision="bf16", lora=True, lora_dropout=0.05, liger=True)
    assert 15 < gib < 19  # ~8.7 MB per token, see the docstring
    more = memory.activation_gib(LLAMA_7B, 2048, precision="bf16", lora=True, lora_dropout=0.05, liger=False)
    assert more > gib  # HF's RMSNorm keeps fp32 copies and the logits are materialised
