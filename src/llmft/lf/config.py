"""params.yaml `train:` -> a LLaMA-Factory training config, and how to launch it. No I/O.

train.profile adds speed settings for the machine it will run on (profile.py: plan_profile, probe_runtime).

    sections = build_config(params.train, model_path=..., template=..., ..., runtime=Runtime(cuda=True, ...))
    validate(sections, params.train.extra)   # unknown or reserved keys -> UserError, before any model loads
    cmd, env = launch_command("train_config.yaml", os.environ, world.launch_env(), bin_dir=".venv/bin")
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from typing import Any

import yaml

from llmft.common import UserError
from llmft.lf.profile import CPU, Runtime, plan_profile

DEEPSPEED_CONFIGS = {"z2": "configs/deepspeed/ds_z2.json", "z3": "configs/deepspeed/ds_z3.json"}
# Set by the train stage itself: from params they would break resume, outputs or the pipeline graph.
RESERVED = {
    "output_dir": "--checkpoints",
    "overwrite_output_dir": "checkpoints restart by themselves when params change",
    "resume_from_checkpoint": "the newest complete checkpoint is resumed",
    "report_to": "always dvclive",
    "save_only_model": "a checkpoint without optimizer state cannot be resumed",
    "stage": "sft",
    "do_train": "true",
    "model_name_or_path": "models/base",
    "template": "models/base",
    "trust_remote_code": "model.trust_remote_code",
    "dataset": "data/processed",
    "eval_dataset": "data/processed",
    "dataset_dir": "data/processed",
    "deepspeed": "train.deepspeed",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "data_seed": "train.seed",
    "eval_strategy": "train.eval_steps",
}


def choose_precision(requested: str, cuda_available: bool, bf16_supported: bool, cpu_fast: bool = False) -> str:
    """bf16 where the GPU has it, fp16 on older CUDA GPUs (a T4); on a CPU bf16 where it has a bf16 matrix unit
    (`bf16_supported`) and the fast profile runs (`cpu_fast`), else fp32. A forced choice is checked."""
    if requested == "auto":
        if not cuda_available:
            return "bf16" if cpu_fast and bf16_supported else "fp32"
        return "bf16" if bf16_supported else "fp16"
    if requested == "fp16" and not cuda_available:
        raise UserError("train.precision=fp16 needs a CUDA GPU; use fp32 (or bf16) on a CPU, or precision: auto")
    if requested == "bf16" and cuda_available and not bf16_supported:
        raise UserError("train.precision=bf16: this GPU has no bf16 support (e.g. a T4); use fp16, or precision: auto")
    if requested == "bf16" and not cuda_available and not bf16_supported:
        raise UserError(
            "train.precision=bf16: this CPU has no bf16 matrix unit (AVX512-BF16 or AMX), so bf16 would run slower "
            "than fp32; use precision: auto (fp32 here) or fp32"
        )
    return requested


def build_config(
    t,
    *,
    model_path: str,
    template: str,
    trust_remote_code: bool,
    data_dir: str,
    output_dir: str,
    precision: str,
    deepspeed_config: str | None = None,
    runtime: Runtime = CPU,
) -> dict[str, dict[str, Any]]:
    """One LLaMA-Factory SFT config, in the sections of its examples/ files. `t` is a params.TrainParams;
    `runtime` is what train.profile needs to know (see plan_profile): its keys go in a `### profile` section."""
    method: dict[str, Any] = {"stage": "sft", "do_train": True, "finetuning_type": t.finetuning_type}
    if t.finetuning_type == "lora":
        method |= {
            "lora_rank": t.lora_rank,
            "lora_alpha": t.lora_alpha,
            "lora_dropout": t.lora_dropout,
            "lora_target": t.lora_target,
            "use_dora": t.use_dora,
            "use_rslora": t.use_rslora,
        }
    if t.quantization_bit:
        method |= {"quantization_bit": t.quantization_bit, "quantization_method": "bnb"}
    if deepspeed_config:
        method["deepspeed"] = deepspeed_config
    train: dict[str, Any] = {
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "num_train_epochs": t.num_train_epochs,
        "lr_scheduler_type": t.lr_scheduler_type,
        "warmup_steps": t.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio; warmup_ratio is deprecated
        "seed": t.seed,
        "data_seed": t.seed,
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
        "output": {
            "output_dir": output_dir,
            "overwrite_output_dir": False,
            "logging_steps": t.logging_steps,
            "save_steps": t.save_steps,
            "save_total_limit": t.save_total_limit,
            "plot_loss": True,
            "report_to": "dvclive",
            "include_effective_tokens_per_second": True,
        },
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

    classes = (
        hparams.ModelArguments,
        hparams.DataArguments,
        hparams.TrainingArguments,
        hparams.FinetuningArguments,
        hparams.GeneratingArguments,
    )
    return {f.name for cls in classes for f in dataclasses.fields(cls) if f.init}


def validate(
    sections: Mapping[str, Mapping[str, Any]],
    extra: Mapping[str, Any],
    known: set[str] | None = None,
    typed: set[str] = frozenset(),
) -> None:
    """Reject an extra key that is reserved, has a typed train.* key, or that LLaMA-Factory doesn't know.

    The keys build_config writes itself are checked by tests/test_lf_config.py, so without extra keys this skips
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


def launch_command(
    config_path: str, environ: Mapping[str, str], world_env: Mapping[str, str], bin_dir: str
) -> tuple[list[str], dict[str, str]]:
    """`llamafactory-cli train <config>` and its environment: `environ` with `world_env` over it (world.py's
    launch_env: FORCE_TORCHRUN, NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_*, OMP_NUM_THREADS). LLaMA-Factory starts
    torchrun itself from those. `bin_dir` (the venv's) goes first on PATH, where LLaMA-Factory looks for torchrun.
    """
    env = dict(environ) | dict(world_env)
    for key in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if not env.get(key):  # set but empty: LF would pass "" to torchrun instead of its default
            env.pop(key, None)
    env["PATH"] = os.pathsep.join([bin_dir, env["PATH"]] if env.get("PATH") else [bin_dir])
    env.setdefault("DVCLIVE_LOGLEVEL", "ERROR")  # dvclive's "can't save an experiment here" warnings are noise
    return [os.path.join(bin_dir, "llamafactory-cli"), "train", config_path], env
