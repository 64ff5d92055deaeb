"""Model FLOPs of the LoRA training step (pads never count) and the matmul rate this device reaches: what MFU is
measured against."""

from __future__ import annotations

import statistics
import time


def matmul_ceiling(cuda: bool, shape: dict | None = None, bf16: bool = True) -> tuple[float, str]:
    """TFLOP/s of matmuls on this device, median of 10 after warm-up.

    CUDA: bf16 8192^3. CPU: the model's own linear shapes (a micro-batch of 600 tokens times each weight: what a
    training step multiplies), in bf16 where the CPU has a bf16 unit (`bf16`), else fp32: the rate the arms are
    measured against.
    """
    import torch

    if cuda:
        sizes, dtype, device = [(8192, 8192, 8192)], torch.bfloat16, "cuda"
    else:
        # never below SmolLM2-135M's shapes: a tiny model's own matmuls are too small to show the CPU's rate
        h, inter = max((shape or {}).get("hidden_size", 0), 576), max((shape or {}).get("intermediate_size", 0), 1536)
        sizes, dtype, device = (
            [(600, h, inter), (600, inter, h), (600, h, h)],
            (torch.bfloat16 if bf16 else torch.float32),
            "cpu",
        )
    rates = []
    for m, k, n in sizes:
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        times = []
        for i in range(13):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                a @ b
                end.record()
                torch.cuda.synchronize()
                seconds = start.elapsed_time(end) / 1000
            else:
                t0 = time.perf_counter()
                for _ in range(10):
                    a @ b
                seconds = (time.perf_counter() - t0) / 10
            if i >= 3:
                times.append(seconds)
        rates.append(2 * m * k * n / statistics.median(times) / 1e12)
        del a, b
    if cuda:
        torch.cuda.empty_cache()
    label = "x".join(map(str, sizes[0])) + ("" if len(sizes) == 1 else " and the other linear shapes")
    return statistics.mean(rates), f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} {label}"


def linear_params(shape: dict, lora_rank: int) -> tuple[int, int]:
    """(frozen linear weights incl. the lm_head, LoRA weights on every linear layer of the blocks)."""
    h, layers, inter, vocab = (
        shape[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    )
    q = shape["num_attention_heads"] * shape["head_dim"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    linear = layers * (h * q + 2 * h * kv + q * h + 3 * h * inter) + h * vocab
    lora = layers * lora_rank * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + inter) + (inter + h))
    return linear, lora


def flops_per_example(shape: dict, lora_rank: int, length: int) -> float:
    """Model FLOPs of one example of `length` tokens, forward + backward: frozen weights cost 4 per parameter and
    token (forward 2 + input gradients 2), LoRA weights 6, and causal attention 12 x layers x (heads x head_dim)
    x context per token (QK^T and AV, forward 4, backward 8). Recomputation (gradient checkpointing) never counts."""
    linear, lora = linear_params(shape, lora_rank)
    q = shape["num_attention_heads"] * shape["head_dim"]
    attention = 12 * shape["num_hidden_layers"] * q * length * (length + 1) / 2
    return (4 * linear + 6 * lora) * length + attention
