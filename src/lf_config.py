"""params.yaml `train:` -> a LLaMA-Factory training config, how to launch it, how much memory it needs. No I/O.

train.profile adds speed settings for the machine it will run on (plan_profile); lf_run.probe_runtime() says
what that machine is (a CPU by default: then the profile adds nothing).

    sections = build_config(params.train, model_path=..., template=..., ..., runtime=Runtime(cuda=True, ...))
    validate(sections, params.train.extra)   # unknown or reserved keys -> UserError, before any model loads
    cmd, env = launch_command("train_config.yaml", os.environ, deepspeed="z2", bin_dir=".venv/bin")
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from typing import Any

import yaml

from common import UserError

DEEPSPEED_CONFIGS = {"z2": "configs/deepspeed/ds_z2.json", "z3": "configs/deepspeed/ds_z3.json"}
# Set by the train stage itself: from params they would break resume, outputs or the pipeline graph.
RESERVED = {
    "output_dir": "--checkpoints", "overwrite_output_dir": "checkpoints restart by themselves when params change",
    "resume_from_checkpoint": "the newest complete checkpoint is resumed", "report_to": "always dvclive",
    "save_only_model": "a checkpoint without optimizer state cannot be resumed", "stage": "sft", "do_train": "true",
    "model_name_or_path": "models/base", "template": "models/base", "trust_remote_code": "model.trust_remote_code",
    "dataset": "data/processed", "eval_dataset": "data/processed", "dataset_dir": "data/processed",
    "deepspeed": "train.deepspeed", "bf16": "train.precision", "fp16": "train.precision", "data_seed": "train.seed",
    "eval_strategy": "train.eval_steps",
}


def choose_precision(requested: str, cuda_available: bool, bf16_supported: bool) -> str:
    """bf16 where the GPU has it, fp16 on older CUDA GPUs (a T4), fp32 on CPU; a forced choice is checked."""
    if requested == "auto":
        return "fp32" if not cuda_available else "bf16" if bf16_supported else "fp16"
    if requested == "fp16" and not cuda_available:
        raise UserError("train.precision=fp16 needs a CUDA GPU; use fp32 (or bf16) on a CPU, or precision: auto")
    if requested == "bf16" and cuda_available and not bf16_supported:
        raise UserError("train.precision=bf16: this GPU has no bf16 support (e.g. a T4); use fp16, or precision: auto")
    return requested


# Model types whose Liger kernels LLaMA-Factory 0.9.5 applies (llamafactory/model/model_utils/liger_kernel.py).
LIGER_MODELS = {"gemma", "gemma2", "gemma3", "gemma3_text", "glm", "glm4", "granite", "llama", "mistral", "mixtral",
                "olmo2", "phi3", "qwen2", "qwen3", "qwen3_moe"}
MICRO_BATCH_TOKENS = 2048  # a packed micro-batch this long keeps a GPU's matmuls busy; more only costs memory
GPU_MEMORY_USE = 0.8  # turn gradient checkpointing off only if the estimate leaves 20% of the GPU free


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What the train.profile needs to know about the machine and the data; lf_run.probe_runtime() fills it in.

    The default is a CPU, about which the profile needs nothing more.
    """

    cuda: bool = False
    gpu_mem_gib: float = 0.0
    kernels: frozenset[str] = frozenset()  # optional packages that import here: "flash_attn", "liger_kernel"
    cpu_count: int = 1
    model_config: Mapping[str, Any] | None = None  # the base model's config.json; None = unknown (a hub id)
    weights_bytes: int = 0  # size of its weight files
    example_tokens: tuple[int, ...] = ()  # tokenized length of each train example (template included), in order


CPU = Runtime()

@dataclasses.dataclass
class Profile:
    """What a train.profile changes: LLaMA-Factory keys for a `### profile` section, new batch sizes, and why."""

    name: str  # fast or plain, after auto is resolved
    keys: dict[str, Any] = dataclasses.field(default_factory=dict)
    batch: tuple[int, int] | None = None  # (per_device_train_batch_size, gradient_accumulation_steps) in packs
    notes: list[str] = dataclasses.field(default_factory=list)
    estimate_gib: float | None = None  # estimated peak GPU memory with gradient checkpointing off


def greedy_knapsack_count(lengths: list[int], capacity: int) -> int:
    """How many packs LLaMA-Factory's greedy_knapsack (data/processor/processor_utils.py) makes of `lengths`:
    each pack takes the longest example that still fits, until none does."""
    import bisect

    items, packs = sorted(lengths), 0
    while items:
        packs, room = packs + 1, capacity
        while (i := bisect.bisect(items, room)) > 0:
            room -= items.pop(i - 1)
    return packs


def count_packs(lengths: tuple[int, ...], cutoff_len: int, chunk: int = 1000) -> int:
    """Packs LLaMA-Factory's neat_packing makes: it packs each preprocessing chunk (preprocessing_batch_size
    examples, in dataset order) on its own, into cutoff_len - 1 tokens per pack."""
    return sum(greedy_knapsack_count(list(lengths[i:i + chunk]), cutoff_len - 1) for i in range(0, len(lengths), chunk))


def activation_gib(model_config: Mapping[str, Any], tokens: int, *, precision: str, lora: bool, lora_dropout: float,
                   liger: bool) -> float:
    """Activations kept for backward without gradient checkpointing, in GiB, per micro-batch of `tokens`.

    Counted per layer and token, in units of the activation size b (2 bytes in 16-bit, 4 in fp32): RMSNorm 5h
    each (HF upcasts to fp32; Liger's keeps 1h), attention 6h + 3 kv (inputs, q/k/v after RoPE, SDPA output),
    SwiGLU MLP h + 4i (Liger's recomputes the activation: h + 3i), and with LoRA dropout a dropped copy plus a
    mask of each adapted layer's input ((b + 1) x (6h + i) bytes for all linear layers). The logits (12 bytes
    x vocab per token in HF's loss, ~0 with Liger's fused cross-entropy) come on top. For Llama-2-7B in bf16
    with LoRA and Liger this is ~8.7 MB per token: 17 GiB for one packed 2048-token sequence.
    """
    c = model_config.get("text_config", model_config)
    h, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads", heads) * (c.get("head_dim") or h // heads)
    inter = c.get("intermediate_size", 4 * h)
    b = 4 if precision == "fp32" else 2
    norms = 2 * (1 if liger else 5) * b * h
    attention = b * (6 * h + 3 * kv)
    mlp = b * (h + (3 if liger else 4) * inter)
    dropout = (b + 1) * (6 * h + inter) if lora and lora_dropout > 0 else 0
    logits = 0 if liger else 12 * vocab
    return tokens * (layers * (norms + attention + mlp + dropout) + logits) / 2**30


def plan_profile(t, runtime: Runtime, precision: str) -> Profile:
    """The settings train.profile adds, from params (`t`), the machine and the data. Pure: no I/O.

    auto is fast on CUDA and plain on a CPU. plain adds nothing: LLaMA-Factory's defaults. fast adds what
    keeps learning intact (same examples per optimizer step, same loss; only the arithmetic is arranged
    differently), never a key the user set in train.extra:
      - flash_attn: fa2 where flash_attn imports, else sdpa (PyTorch's fused kernels)
      - enable_liger_kernel where liger_kernel imports and LLaMA-Factory has kernels for the model (fused
        RMSNorm, SwiGLU, RoPE and a cross-entropy that never materialises the logits)
      - neat_packing: several examples per sequence, each attending only to itself, instead of padding every
        example to the longest of its batch. A pack counts as one example for per_device_train_batch_size,
        so the batch is rescaled to as many packs as hold the examples of one plain optimizer step. Skipped
        when an example would not fit (packing drops those instead of truncating them) or when a single pack
        would hold more than one step's examples (tiny data): both would change what is learned
      - disable_gradient_checkpointing when the estimated peak (without it) fits in 80% of the GPU:
        recomputing the forward pass costs a third of a LoRA step
      - dataloader_num_workers 2 where there are >= 4 CPU cores: batches are built while the GPU works
    On a CPU (fast forced), only packing applies; gradient checkpointing is already off in fp32 (src/train.py).
    """
    extra, notes = t.extra, []
    name = t.profile if t.profile != "auto" else ("fast" if runtime.cuda else "plain")
    prof = Profile(name, notes=notes)
    if name == "plain":
        notes.append("plain: LLaMA-Factory defaults" + (" (auto on a CPU)" if t.profile == "auto" else ""))
        return prof
    keys: dict[str, Any] = {}
    model_type = (runtime.model_config or {}).get("model_type")
    if runtime.cuda:
        keys["flash_attn"] = "fa2" if "flash_attn" in runtime.kernels else "sdpa"
        if "liger_kernel" in runtime.kernels and model_type in LIGER_MODELS:
            keys["enable_liger_kernel"] = True
        elif "liger_kernel" not in runtime.kernels:
            notes.append("no Liger kernels: pip install liger-kernel")
        if runtime.cpu_count >= 4:
            keys["dataloader_num_workers"] = 2
    flash = extra.get("flash_attn", keys.get("flash_attn"))
    liger = bool(extra.get("enable_liger_kernel", keys.get("enable_liger_kernel", False)))

    batch, accum = t.per_device_train_batch_size, t.gradient_accumulation_steps
    micro_tokens = batch * t.cutoff_len  # the longest micro-batch without packing
    if "neat_packing" not in extra and "packing" not in extra:
        lengths = runtime.example_tokens[:t.max_samples] if t.max_samples else runtime.example_tokens
        if not lengths:
            notes.append("no neat_packing: the examples' token lengths are unknown")
        elif max(lengths) > t.cutoff_len - 1:
            notes.append(f"no neat_packing: an example has {max(lengths)} tokens; packing would drop it, not "
                         f"truncate it to train.cutoff_len {t.cutoff_len}")
        else:
            per_pack = len(lengths) / count_packs(lengths, t.cutoff_len, extra.get("preprocessing_batch_size", 1000))
            step_packs = max(1, round(batch * accum / per_pack))
            if abs(step_packs * per_pack / (batch * accum) - 1) > 0.25:
                notes.append(f"no neat_packing: a pack holds {per_pack:.1f} examples, so {step_packs} pack(s) per "
                             f"optimizer step would be far from its {batch * accum} examples and change the batch")
            else:
                want = 1 if flash == "fa2" else max(1, -(-MICRO_BATCH_TOKENS // t.cutoff_len))  # LF: fa2 packs bsz 1
                batch = max(d for d in range(1, min(want, step_packs) + 1) if step_packs % d == 0)
                accum = step_packs // batch
                micro_tokens = batch * t.cutoff_len
                keys["neat_packing"] = True
                prof.batch = (batch, accum)
                notes.append(f"neat_packing: {per_pack:.1f} examples per {t.cutoff_len}-token pack, so "
                             f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps} examples -> "
                             f"{batch} x {accum} packs per optimizer step")

    if runtime.cuda and precision != "fp32" and "disable_gradient_checkpointing" not in extra:
        if runtime.model_config and runtime.weights_bytes and runtime.gpu_mem_gib:
            fixed = estimate_peak_gib(runtime.model_config, runtime.weights_bytes, finetuning_type=t.finetuning_type,
                                      lora_rank=t.lora_rank, quantization_bit=t.quantization_bit, precision=precision,
                                      batch=1, seq=1)
            act = activation_gib(runtime.model_config, micro_tokens, precision=precision,
                                 lora=t.finetuning_type == "lora", lora_dropout=t.lora_dropout, liger=liger)
            prof.estimate_gib = fixed["weights"] + fixed["optimizer"] + fixed["cuda"] + act
            fits = prof.estimate_gib <= GPU_MEMORY_USE * runtime.gpu_mem_gib
            if fits:
                keys["disable_gradient_checkpointing"] = True
            notes.append(f"gradient checkpointing {'off' if fits else 'on'}: ~{prof.estimate_gib:.1f} GiB estimated "
                         f"without it, {'within' if fits else 'over'} {GPU_MEMORY_USE:.0%} of "
                         f"{runtime.gpu_mem_gib:.0f} GiB")
        else:
            notes.append("gradient checkpointing on: no local config.json to estimate memory from")
    prof.keys = {k: v for k, v in keys.items() if k not in extra}
    notes.insert(0, f"{name}{' (auto on CUDA)' if t.profile == 'auto' else ''}: "
                    + (", ".join(f"{k}={v}" for k, v in prof.keys.items()) or "nothing to change"))
    return prof


def build_config(t, *, model_path: str, template: str, trust_remote_code: bool, data_dir: str, output_dir: str,
                 precision: str, deepspeed_config: str | None = None,
                 runtime: Runtime = CPU) -> dict[str, dict[str, Any]]:
    """One LLaMA-Factory SFT config, in the sections of its examples/ files. `t` is a params.TrainParams;
    `runtime` is what train.profile needs to know (see plan_profile): its keys go in a `### profile` section."""
    method: dict[str, Any] = {"stage": "sft", "do_train": True, "finetuning_type": t.finetuning_type}
    if t.finetuning_type == "lora":
        method |= {"lora_rank": t.lora_rank, "lora_alpha": t.lora_alpha, "lora_dropout": t.lora_dropout,
                   "lora_target": t.lora_target, "use_dora": t.use_dora, "use_rslora": t.use_rslora}
    if t.quantization_bit:
        method |= {"quantization_bit": t.quantization_bit, "quantization_method": "bnb"}
    if deepspeed_config:
        method["deepspeed"] = deepspeed_config
    train: dict[str, Any] = {
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate, "num_train_epochs": t.num_train_epochs,
        "lr_scheduler_type": t.lr_scheduler_type,
        "warmup_steps": t.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio; warmup_ratio is deprecated
        "seed": t.seed, "data_seed": t.seed,
    }
    if t.max_steps:
        train["max_steps"] = t.max_steps
    if precision in ("bf16", "fp16"):
        train[precision] = True
    sections = {
        "model": {"model_name_or_path": model_path, "template": template, "trust_remote_code": trust_remote_code},
        "method": method,
        "dataset": {"dataset_dir": data_dir, "dataset": "train", "eval_dataset": "val", "cutoff_len": t.cutoff_len}
        | ({"max_samples": t.max_samples} if t.max_samples else {}),
        "output": {"output_dir": output_dir, "overwrite_output_dir": False, "logging_steps": t.logging_steps,
                   "save_steps": t.save_steps, "save_total_limit": t.save_total_limit, "plot_loss": True,
                   "report_to": "dvclive", "include_effective_tokens_per_second": True},
        "train": train,
        "eval": {"eval_strategy": "steps", "eval_steps": t.eval_steps},
    }
    profile = plan_profile(t, runtime, precision)
    if profile.batch:
        train["per_device_train_batch_size"], train["gradient_accumulation_steps"] = profile.batch
    if profile.keys:
        sections["profile"] = profile.keys
    if t.extra:
        sections["extra"] = dict(t.extra)
    return sections


def absolute_paths(sections: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """A copy where relative paths (*_dir, *_path, deepspeed) that exist from here are absolute, for a child run
    elsewhere; a hub id stays as it is."""
    def fix(k: str, v: Any) -> Any:
        is_path = k.endswith(("_dir", "_path", "deepspeed")) and isinstance(v, str) and not os.path.isabs(v)
        return os.path.abspath(v) if is_path and os.path.exists(v) else v
    return {name: {k: fix(k, v) for k, v in section.items()} for name, section in sections.items()}


def flat(sections: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {k: v for section in sections.values() for k, v in section.items()}


def lf_fields() -> set[str]:
    """Every argument `llamafactory-cli train` accepts (imports LLaMA-Factory: ~10 s)."""
    from llamafactory import hparams

    classes = (hparams.ModelArguments, hparams.DataArguments, hparams.TrainingArguments,
               hparams.FinetuningArguments, hparams.GeneratingArguments)
    return {f.name for cls in classes for f in dataclasses.fields(cls) if f.init}


def validate(sections: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Any], known: set[str] | None = None,
             typed: set[str] = frozenset()) -> None:
    """Reject an extra key that is reserved, has a typed train.* key, or that LLaMA-Factory doesn't know.

    The keys build_config writes itself are checked by tests/test_train.py, so without extra keys this skips
    the slow import of LLaMA-Factory."""
    for key in extra:
        if key in RESERVED:
            raise UserError(f"train.extra.{key}: set by the train stage ({RESERVED[key]}); remove it from train.extra")
        if key in typed:
            raise UserError(f"train.extra.{key}: use train.{key} instead of train.extra.{key}")
    if not extra and known is None:
        return
    known = lf_fields() if known is None else known
    for key in flat(sections):
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"train.extra.{key}: not a LLaMA-Factory training argument{hint}")


def to_yaml(sections: Mapping[str, Mapping[str, Any]], header: list[str]) -> str:
    """LLaMA-Factory house style: a comment header, then `### section` blocks."""
    parts = ["".join(f"# {line}\n" for line in header)]
    for name, section in sections.items():
        parts.append(f"\n### {name}\n" + yaml.safe_dump(dict(section), sort_keys=False, allow_unicode=True))
    return "".join(parts)


def launch_command(config_path: str, environ: Mapping[str, str], deepspeed: str | None,
                   bin_dir: str) -> tuple[list[str], dict[str, str]]:
    """`llamafactory-cli train <config>` and its environment.

    LLaMA-Factory itself starts torchrun when it sees several GPUs, or FORCE_TORCHRUN; NNODES, NODE_RANK,
    NPROC_PER_NODE, MASTER_ADDR and MASTER_PORT pass through untouched. DeepSpeed and multi-node runs need
    torchrun even with one GPU per node, so they force it. `bin_dir` (the venv's) goes first on PATH, where
    LLaMA-Factory looks for torchrun.
    """
    env = dict(environ)
    if deepspeed or int(env.get("NNODES", "1")) > 1:
        env["FORCE_TORCHRUN"] = "1"
    env["PATH"] = os.pathsep.join([bin_dir, env["PATH"]] if env.get("PATH") else [bin_dir])
    env.setdefault("DVCLIVE_LOGLEVEL", "ERROR")  # dvclive's "can't save an experiment here" warnings are noise
    return [os.path.join(bin_dir, "llamafactory-cli"), "train", config_path], env


def estimate_peak_gib(model_config: Mapping[str, Any], weights_bytes: int, *, finetuning_type: str, lora_rank: int,
                      quantization_bit: int | None, precision: str, batch: int, seq: int,
                      grad_checkpointing: bool = True) -> dict[str, float]:
    """Rough peak GPU memory per GPU (no ZeRO sharding), in GiB, from config.json and the size of the weight files:

    weights      n_params x bytes per weight (4 fp32, 2 bf16/fp16, 1 int8, 0.5 int4)
    optimizer    16 bytes per trainable parameter (fp32 copy, gradient, two Adam moments); LoRA trains
                 rank x (in + out) of the 7 linear layers of each block, freeze the last 2 blocks
    activations  batch x seq x hidden x layers x k bytes, k = 17 x activation bytes (34 in 16-bit, after
                 Korthikanti et al. 2022); with gradient checkpointing only layer inputs stay, plus one layer
    logits       batch x seq x vocab x 8 (fp32 logits and their gradient): large for small models, big vocabularies
    cuda         0.5 for the CUDA context and allocator slack
    """
    c = model_config.get("text_config", model_config)
    dtype = model_config.get("dtype") or model_config.get("torch_dtype")
    n_params = weights_bytes // {"bfloat16": 2, "float16": 2}.get(dtype, 4)
    hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv_dim = c.get("num_key_value_heads", heads) * (c.get("head_dim") or hidden // heads)
    inter = c.get("intermediate_size", 4 * hidden)
    act_bytes = 4 if precision == "fp32" else 2
    weight_bytes = {4: 0.5, 8: 1}.get(quantization_bit or 0, act_bytes)
    if finetuning_type == "lora":
        trainable = lora_rank * layers * (9 * hidden + 2 * kv_dim + 3 * inter)  # in + out of q,k,v,o,gate,up,down
    elif finetuning_type == "freeze":
        trainable = (n_params - vocab * hidden) * min(2, layers) // layers
    else:
        trainable = n_params
    tokens = batch * seq
    act = tokens * hidden * act_bytes * ((layers + 17) if grad_checkpointing else 17 * layers)
    parts = {"weights": n_params * weight_bytes, "optimizer": 16 * trainable, "activations": act,
             "logits": 8 * tokens * vocab, "cuda": 0.5 * 2**30}
    parts = {k: v / 2**30 for k, v in parts.items()}
    return parts | {"total": sum(parts.values())}
