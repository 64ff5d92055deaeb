"""train.profile: speed settings for the machine a run will use, without changing what is learned.

    runtime = probe_runtime(params.train, "models/base", "smollm2", Path("data/processed"), "bf16")  # reads the machine
    plan = plan_profile(params.train, runtime, "bf16")   # pure: the keys for a `### profile` section, and why

auto is fast, on CUDA and on a CPU. plain adds nothing: LLaMA-Factory's defaults (on a CPU in fp32 the train stage
still turns gradient checkpointing off). fast adds what keeps learning intact (same examples per optimizer step,
same loss; only the arithmetic is arranged differently), never a key the user set in train.extra (the user wins,
and the log says so).

On CUDA:
  - flash_attn: fa2 where flash_attn imports, else sdpa (PyTorch's fused kernels)
  - enable_liger_kernel where liger_kernel imports and LLaMA-Factory has kernels for the model (fused
    RMSNorm, SwiGLU, RoPE and a cross-entropy that never materialises the logits)
  - neat_packing: several examples per sequence, each attending only to itself, instead of padding every
    example to the longest of its batch. A pack counts as one example for per_device_train_batch_size,
    so the batch is rescaled to as many packs as hold the examples of one plain optimizer step. Skipped
    when an example would not fit (packing drops those instead of truncating them) or when a step's packs
    would hold far more or fewer examples than a plain step (tiny data): both would change what is learned
  - disable_gradient_checkpointing when the estimated peak (without it) fits in 80% of the GPU:
    recomputing the forward pass costs a third of a LoRA step
  - dataloader_num_workers 2 where there are >= 4 CPU cores: batches are built while the GPU works
On a CPU (measured on a 2-core AMD EPYC with AVX512-BF16, SmolLM2-135M LoRA on the demo data, 30 steps each;
docs/performance.md): precision bf16 where the CPU has a bf16 matrix unit (lf/cpu.py; training.py picks it), then
  - the frozen base weights in bf16 (base_dtype): LLaMA-Factory loads a model as its config.json says, and an
    fp32 base under autocast is cast to bf16 again at every use (1.04x)
  - flash_attn disabled (eager attention) in bf16: the CPU SDPA kernel's bf16 backward is several times its fp32
    one (17% of a step on a Xeon); eager attention took 170 -> 215 tokens/s
  - gradient checkpointing off: a CPU has the RAM, and recomputing the forward pass costs a third of a step
  - use_cpu: what HF's Trainer needs for bf16 autocast on a CPU
Not chosen on a CPU, by measurement: two processes of one thread (1.04x in bf16, eaten by the second process's
start-up on a run of a few minutes; `make train NPROC=2` still does it) and neat_packing (1.11x, and with eager
attention the loss diverged). LoRA dropout is a training value (params.yaml), not a profile setting.
"""

from __future__ import annotations

import bisect
import dataclasses
import importlib.util
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmft.common import get_logger
from llmft.cpu import CpuIsa, detect_cpu
from llmft.lf.encode import example_lengths
from llmft.lf.memory import estimate_peak_gib

log = get_logger("train")

# Model types whose Liger kernels LLaMA-Factory 0.9.5 applies (llamafactory/model/model_utils/liger_kernel.py).
LIGER_MODELS = {
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "glm",
    "glm4",
    "granite",
    "llama",
    "mistral",
    "mixtral",
    "olmo2",
    "phi3",
    "qwen2",
    "qwen3",
    "qwen3_moe",
}
MICRO_BATCH_TOKENS = 2048  # a packed micro-batch this long keeps a GPU's matmuls busy; more only costs memory
GPU_MEMORY_USE = 0.8  # turn gradient checkpointing off only if the estimate leaves 20% of the GPU free
# A step of whole packs holds a whole number of packs, so its example count drifts from batch x accumulation;
# beyond 25% more or fewer examples per step the effective batch (and so the learning) would change noticeably.
PACK_STEP_TOLERANCE = 0.25


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What the train.profile needs to know about the machine and the data; probe_runtime() fills it in.

    The default is a CPU, about which the profile needs nothing more.
    """

    cuda: bool = False
    gpu_mem_gib: float = 0.0
    kernels: frozenset[str] = frozenset()  # optional packages that import here: "flash_attn", "liger_kernel"
    cpu_count: int = 1
    model_config: Mapping[str, Any] | None = None  # the base model's config.json; None = unknown (a hub id)
    weights_bytes: int = 0  # size of its weight files
    example_tokens: tuple[int, ...] = ()  # tokenized length of each train example (template included), in order
    cpu_isa: CpuIsa = CpuIsa()  # what the CPU offers (bf16 matrix units); read when there is no GPU


CPU = Runtime()


@dataclasses.dataclass
class Profile:
    """What a train.profile changes: LLaMA-Factory keys for a `### profile` section, new batch sizes, and why."""

    name: str  # fast or plain, after auto is resolved
    keys: dict[str, Any] = dataclasses.field(default_factory=dict)
    batch: tuple[int, int] | None = None  # (per_device_train_batch_size, gradient_accumulation_steps) in packs
    notes: list[str] = dataclasses.field(default_factory=list)
    estimate_gib: float | None = None  # estimated peak GPU memory with gradient checkpointing off
    base_dtype: str | None = None  # load the frozen base weights in this dtype (a CPU in bf16); None = as stored


def resolve_name(profile: str, cuda: bool) -> str:
    """auto -> fast (CUDA and CPU alike; `cuda` is kept for the callers' symmetry)."""
    return "fast" if profile == "auto" else profile


def greedy_knapsack_count(lengths: list[int], capacity: int) -> int:
    """How many packs LLaMA-Factory's greedy_knapsack (data/processor/processor_utils.py) makes of `lengths`:
    each pack takes the longest example that still fits, until none does."""
    items, packs = sorted(lengths), 0
    while items:
        packs, room = packs + 1, capacity
        while (i := bisect.bisect(items, room)) > 0:
            room -= items.pop(i - 1)
    return packs


def count_packs(lengths: tuple[int, ...], cutoff_len: int, chunk: int = 1000) -> int:
    """Packs LLaMA-Factory's neat_packing makes: it packs each preprocessing chunk (preprocessing_batch_size
    examples, in dataset order) on its own, into cutoff_len - 1 tokens per pack."""
    return sum(
        greedy_knapsack_count(list(lengths[i : i + chunk]), cutoff_len - 1) for i in range(0, len(lengths), chunk)
    )


def _kernel_keys(runtime: Runtime, notes: list[str]) -> dict[str, Any]:
    """Decision 1 (CUDA only): attention kernels, Liger, dataloader workers."""
    keys: dict[str, Any] = {"flash_attn": "fa2" if "flash_attn" in runtime.kernels else "sdpa"}
    model_type = (runtime.model_config or {}).get("model_type")
    if "liger_kernel" in runtime.kernels and model_type in LIGER_MODELS:
        keys["enable_liger_kernel"] = True
    elif "liger_kernel" not in runtime.kernels:
        notes.append("no Liger kernels: pip install liger-kernel")
    if runtime.cpu_count >= 4:
        keys["dataloader_num_workers"] = 2
    return keys


def _packed_batch(t, runtime: Runtime, flash: str | None, notes: list[str]) -> tuple[int, int] | None:
    """Decision 2: (packs per micro-batch, accumulation) holding one plain optimizer step's examples, or None."""
    lengths = runtime.example_tokens[: t.max_samples] if t.max_samples else runtime.example_tokens
    if not lengths:
        notes.append("no neat_packing: the examples' token lengths are unknown")
        return None
    if max(lengths) > t.cutoff_len - 1:
        notes.append(
            f"no neat_packing: an example has {max(lengths)} tokens; packing would drop it, not "
            f"truncate it to train.cutoff_len {t.cutoff_len}"
        )
        return None
    step_examples = t.per_device_train_batch_size * t.gradient_accumulation_steps
    per_pack = len(lengths) / count_packs(lengths, t.cutoff_len, t.extra.get("preprocessing_batch_size", 1000))
    step_packs = max(1, round(step_examples / per_pack))
    if abs(step_packs * per_pack / step_examples - 1) > PACK_STEP_TOLERANCE:
        notes.append(
            f"no neat_packing: a pack holds {per_pack:.1f} examples, so {step_packs} pack(s) per "
            f"optimizer step would be far from its {step_examples} examples and change the batch"
        )
        return None
    # LLaMA-Factory packs at micro-batch 1 with fa2; otherwise about MICRO_BATCH_TOKENS per micro-batch
    want = 1 if flash == "fa2" else max(1, math.ceil(MICRO_BATCH_TOKENS / t.cutoff_len))
    batch = max(d for d in range(1, min(want, step_packs) + 1) if step_packs % d == 0)  # divides the step evenly
    notes.append(
        f"neat_packing: {per_pack:.1f} examples per {t.cutoff_len}-token pack, so "
        f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps} examples -> "
        f"{batch} x {step_packs // batch} packs per optimizer step"
    )
    return batch, step_packs // batch


def _checkpointing_off(t, runtime: Runtime, precision: str, micro_tokens: int, liger: bool, prof: Profile) -> bool:
    """Decision 3 (CUDA, 16-bit): whether the estimated peak without gradient checkpointing fits the GPU."""
    if not (runtime.model_config and runtime.weights_bytes and runtime.gpu_mem_gib):
        prof.notes.append("gradient checkpointing on: no local config.json to estimate memory from")
        return False
    prof.estimate_gib = estimate_peak_gib(
        runtime.model_config,
        runtime.weights_bytes,
        finetuning_type=t.finetuning_type,
        lora_rank=t.lora_rank,
        quantization_bit=t.quantization_bit,
        precision=precision,
        batch=1,
        seq=micro_tokens,
        grad_checkpointing=False,
        lora_dropout=t.lora_dropout,
        liger=liger,
    )["total"]
    fits = prof.estimate_gib <= GPU_MEMORY_USE * runtime.gpu_mem_gib
    prof.notes.append(
        f"gradient checkpointing {'off' if fits else 'on'}: ~{prof.estimate_gib:.1f} GiB estimated "
        f"without it, {'within' if fits else 'over'} {GPU_MEMORY_USE:.0%} of {runtime.gpu_mem_gib:.0f} GiB"
    )
    return fits


def _cpu_keys(t, runtime: Runtime, precision: str, prof: Profile) -> dict[str, Any]:
    """The fast profile on a CPU (see the module docstring for the measurements behind each choice)."""
    keys: dict[str, Any] = {"use_cpu": True, "disable_gradient_checkpointing": True}
    cpu = runtime.cpu_isa.describe()
    if precision == "bf16":
        keys["flash_attn"] = "disabled"
        prof.base_dtype = "bfloat16"
        prof.notes.append(
            f"bf16 on this CPU ({cpu}): the frozen base weights load in bf16, LoRA weights and the "
            "optimizer stay fp32 (LLaMA-Factory upcasts trainable parameters)"
        )
        prof.notes.append("flash_attn=disabled: eager attention, as the CPU SDPA kernel's bf16 backward is slow")
    else:
        prof.notes.append(f"fp32 on this CPU ({cpu})")
    prof.notes.append("disable_gradient_checkpointing=True: a CPU has the RAM; recomputing costs a third of a step")
    return keys


def plan_profile(t, runtime: Runtime, precision: str) -> Profile:
    """The settings train.profile adds, from params (`t`, a TrainParams), the machine and the data. Pure: no I/O."""
    extra = t.extra
    prof = Profile(resolve_name(t.profile, runtime.cuda))
    if prof.name == "plain":
        prof.notes.append("plain: LLaMA-Factory defaults")
        return prof
    if not runtime.cuda:
        keys = _cpu_keys(t, runtime, precision, prof)
        prof.keys = {k: v for k, v in keys.items() if k not in extra}
        for key in keys.keys() & extra.keys():
            prof.notes.append(f"train.extra.{key}={extra[key]!r} wins over the profile's {keys[key]!r}")
        if "flash_attn" in extra and prof.base_dtype:
            prof.notes.append("train.extra.flash_attn set: bf16 attention may run slower than the profile's eager")
        prof.notes.insert(
            0,
            f"fast{' (auto)' if t.profile == 'auto' else ''} on a CPU: "
            + (", ".join(f"{k}={v}" for k, v in prof.keys.items()) or "nothing to change")
            + (f", base weights in {prof.base_dtype}" if prof.base_dtype else ""),
        )
        return prof
    keys = _kernel_keys(runtime, prof.notes)
    flash = extra.get("flash_attn", keys.get("flash_attn"))
    liger = bool(extra.get("enable_liger_kernel", keys.get("enable_liger_kernel", False)))
    micro_tokens = t.per_device_train_batch_size * t.cutoff_len  # the longest micro-batch without packing
    if "neat_packing" not in extra and "packing" not in extra:
        prof.batch = _packed_batch(t, runtime, flash, prof.notes)
        if prof.batch:
            keys["neat_packing"] = True
            micro_tokens = prof.batch[0] * t.cutoff_len
    if precision != "fp32" and "disable_gradient_checkpointing" not in extra:
        if _checkpointing_off(t, runtime, precision, micro_tokens, liger, prof):
            keys["disable_gradient_checkpointing"] = True
    prof.keys = {k: v for k, v in keys.items() if k not in extra}
    prof.notes.insert(
        0,
        f"{prof.name}{' (auto)' if t.profile == 'auto' else ''} on CUDA: "
        + (", ".join(f"{k}={v}" for k, v in prof.keys.items()) or "nothing to change"),
    )
    return prof


def probe_runtime(
    t,
    model_path: str,
    template: str,
    data_dir: Path,
    precision: str,
    trust_remote_code: bool = False,
    example_tokens: tuple[int, ...] | None = None,
) -> Runtime:
    """What train.profile needs to know here (Runtime), and a log of what it will change.

    On a CPU only its ISA is read. On CUDA the plain profile needs nothing, so nothing slow runs then; the fast
    profile reads the GPU, which optional kernels import, the model's config.json, and the token length of each
    train example (`example_tokens` when the caller has measured them already).
    """
    import torch

    cuda = torch.cuda.is_available()
    runtime = Runtime(cuda=cuda, cpu_isa=CpuIsa() if cuda else detect_cpu())
    if cuda and resolve_name(t.profile, cuda) == "fast":  # a CPU's fast profile needs only its ISA
        from transformers.utils import is_flash_attn_2_available

        kernels = {"flash_attn"} if is_flash_attn_2_available() else set()
        kernels |= {"liger_kernel"} if importlib.util.find_spec("liger_kernel") else set()
        config = Path(model_path) / "config.json"
        runtime = Runtime(
            cuda=cuda,
            gpu_mem_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
            kernels=frozenset(kernels),
            cpu_count=len(os.sched_getaffinity(0)),
            model_config=json.loads(config.read_text()) if config.exists() else None,
            weights_bytes=sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors")),
            example_tokens=example_tokens
            if example_tokens is not None
            else example_lengths(
                model_path,
                template,
                Path(data_dir),
                t.cutoff_len,
                trust_remote_code,
                limit=min(t.max_samples or 20000, 20000),
            ),
        )
    for note in plan_profile(t, runtime, precision).notes:
        log.info("train.profile %s", note)
    return runtime
