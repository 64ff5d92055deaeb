"""How much GPU memory a training run needs: one model of weights, optimizer state and activations.

    est = estimate_peak_gib(config_json, weights_bytes, finetuning_type="lora", lora_rank=8, quantization_bit=None,
                            precision="bf16", batch=4, seq=1024)      # {"weights": .., ..., "total": ..} in GiB

The train stage logs the estimate before launch; train.profile's fast plan turns gradient checkpointing off
only when the estimate without it fits the GPU (profile.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

GIB = 2**30
CUDA_OVERHEAD_GIB = 0.5  # the CUDA context and the allocator's slack


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """The sizes of a decoder-only transformer, read once from its config.json."""

    hidden: int
    layers: int
    vocab: int
    kv_dim: int  # key/value width: num_key_value_heads x head_dim (less than hidden with grouped-query attention)
    intermediate: int
    dtype: str | None  # the stored weights' dtype, as config.json says

    @classmethod
    def from_config(cls, model_config: Mapping[str, Any]) -> ModelDims:
        c = model_config.get("text_config", model_config)  # multimodal configs nest the language model's
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        return cls(
            hidden=c["hidden_size"],
            layers=c["num_hidden_layers"],
            vocab=c["vocab_size"],
            kv_dim=c.get("num_key_value_heads", heads) * head_dim,
            intermediate=c.get("intermediate_size", 4 * c["hidden_size"]),
            dtype=model_config.get("dtype") or model_config.get("torch_dtype"),
        )


def activation_bytes(
    dims: ModelDims,
    tokens: int,
    *,
    precision: str,
    lora: bool,
    lora_dropout: float,
    liger: bool,
    checkpointing: bool = False,
) -> dict[str, float]:
    """Bytes kept for backward per micro-batch of `tokens`: {"activations": ..., "logits": ...}.

    Counted per layer and token, in units of the activation size b (2 bytes in 16-bit, 4 in fp32): RMSNorm 5h
    each (HF upcasts to fp32; Liger's keeps 1h), attention 6h + 3 kv (inputs, q/k/v after RoPE, SDPA output),
    SwiGLU MLP h + 4i (Liger's recomputes the activation: h + 3i), and with LoRA dropout a dropped copy plus a
    mask of each adapted layer's input ((b + 1) x (6h + i) bytes for all linear layers). With gradient
    checkpointing only each layer's input (b x h) stays, plus one layer's worth while it is recomputed. The
    logits take 12 bytes x vocab per token in HF's loss (fp32 logits, their upcast and gradient), ~0 with
    Liger's fused cross-entropy. For Llama-2-7B in bf16 with LoRA and Liger, without checkpointing, this is
    ~8.7 MB per token: 17 GiB for one packed 2048-token sequence.
    """
    h, i = dims.hidden, dims.intermediate
    b = 4 if precision == "fp32" else 2
    norms = 2 * (1 if liger else 5) * b * h
    attention = b * (6 * h + 3 * dims.kv_dim)
    mlp = b * (h + (3 if liger else 4) * i)
    dropout = (b + 1) * (6 * h + i) if lora and lora_dropout > 0 else 0
    layer = norms + attention + mlp + dropout
    kept = dims.layers * b * h + layer if checkpointing else dims.layers * layer
    return {"activations": tokens * kept, "logits": 0 if liger else tokens * 12 * dims.vocab}


def activation_gib(
    model_config: Mapping[str, Any],
    tokens: int,
    *,
    precision: str,
    lora: bool,
    lora_dropout: float,
    liger: bool,
    checkpointing: bool = False,
) -> float:
    """activation_bytes (activations + logits) for `tokens` tokens, in GiB."""
    parts = activation_bytes(
        ModelDims.from_config(model_config),
        tokens,
        precision=precision,
        lora=lora,
        lora_dropout=lora_dropout,
        liger=liger,
        checkpointing=checkpointing,
    )
    return sum(parts.values()) / GIB


def trainable_parameters(dims: ModelDims, n_params: int, finetuning_type: str, lora_rank: int) -> int:
    """LoRA: rank x (in + out) of the 7 linear layers of each block; freeze: the last 2 blocks; full: all."""
    if finetuning_type == "lora":
        return lora_rank * dims.layers * (9 * dims.hidden + 2 * dims.kv_dim + 3 * dims.intermediate)
    if finetuning_type == "freeze":
        return (n_params - dims.vocab * dims.hidden) * min(2, dims.layers) // dims.layers
    return n_params


def estimate_peak_gib(
    model_config: Mapping[str, Any],
    weights_bytes: int,
    *,
    finetuning_type: str,
    lora_rank: int,
    quantization_bit: int | None,
    precision: str,
    batch: int,
    seq: int,
    grad_checkpointing: bool = True,
    lora_dropout: float = 0.0,
    liger: bool = False,
    world_size: int = 1,
    zero_stage: int | None = None,
) -> dict[str, float]:
    """Rough peak GPU memory per GPU (per process), in GiB, from config.json and the size of the weight files:

    weights      n_params x bytes per weight (4 fp32, 2 bf16/fp16, 1 int8, 0.5 int4)
    optimizer    16 bytes per trainable parameter (fp32 copy, gradient, two Adam moments); see trainable_parameters
    activations  and logits: activation_bytes, for batch x seq tokens
    cuda         0.5 for the CUDA context and allocator slack

    Several processes: DDP (no ZeRO) keeps a whole copy on each GPU, plus buckets of gradients as large as the
    trainable ones (`ddp`); ZeRO-2 splits the optimizer state across the world_size GPUs, ZeRO-3 the weights too.
    """
    dims = ModelDims.from_config(model_config)
    n_params = weights_bytes // {"bfloat16": 2, "float16": 2}.get(dims.dtype, 4)
    weight_bytes = {4: 0.5, 8: 1}.get(quantization_bit or 0, 4 if precision == "fp32" else 2)
    act = activation_bytes(
        dims,
        batch * seq,
        precision=precision,
        lora=finetuning_type == "lora",
        lora_dropout=lora_dropout,
        liger=liger,
        checkpointing=grad_checkpointing,
    )
    trainable = trainable_parameters(dims, n_params, finetuning_type, lora_rank)
    shards = world_size if zero_stage else 1
    parts = {
        "weights": n_params * weight_bytes / (world_size if zero_stage == 3 else 1),
        "optimizer": 16 * trainable / shards,
        **({"ddp": 4 * trainable} if world_size > 1 and not zero_stage else {}),
        **act,
        "cuda": CUDA_OVERHEAD_GIB * GIB,
    }
    parts = {k: v / GIB for k, v in parts.items()}
    return parts | {"total": sum(parts.values())}
