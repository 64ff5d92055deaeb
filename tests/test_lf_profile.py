"""train.profile (src/llmft/lf/profile.py): what fast adds, where, and when not.

Fast tests feed plan_profile / build_config a simulated machine (profile.Runtime: CUDA or not, GPU memory,
which kernels import) and check the keys; one checks the YAML with LLaMA-Factory's own argument parser. The
slow test runs the real train stage with `profile: fast` on a CPU (packing only) on the tiny model. The
learning comparison plain vs fast, same examples per step, is in tests/test_perf.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from lf_configs import H100, config, gpu_config
from llmft.cpu import CpuIsa
from llmft.lf import config as lf_config
from llmft.lf import profile
from llmft.lf.profile import Runtime
from llmft.params import TrainParams
from train_project import make_project, run_stage

BF16_CPU = Runtime(cpu_isa=CpuIsa(avx512_bf16=True, capability="AVX512"))


def test_auto_on_a_bf16_cpu_is_bf16_eager_without_checkpointing_and_learning_unchanged():
    sections = config(BF16_CPU, "bf16")
    assert sections["profile"] == {"use_cpu": True, "disable_gradient_checkpointing": True, "flash_attn": "disabled"}
    plain = config(BF16_CPU, "bf16", profile="plain")
    assert "profile" not in plain
    for key in ("train", "method", "dataset"):  # batch, accumulation, learning rate, LoRA and data as params say
        assert sections[key] == plain[key]
    plan = lf_config.plan_profile(TrainParams(), BF16_CPU, "bf16")
    assert plan.name == "fast" and plan.base_dtype == "bfloat16" and plan.batch is None
    assert plan.notes[0] == (
        "fast (auto) on a CPU: use_cpu=True, disable_gradient_checkpointing=True, flash_attn=disabled, "
        "base weights in bfloat16"
    )
    assert any("bf16 on this CPU (AVX512, avx512_bf16)" in note for note in plan.notes)


def test_a_cpu_in_fp32_keeps_sdpa_and_its_weights_and_plain_adds_nothing():
    # whatever the CPU machine has installed or the data look like
    runtime = Runtime(kernels=frozenset({"liger_kernel", "flash_attn"}), cpu_count=64, example_tokens=(40,) * 100)
    assert config(runtime)["profile"] == {"use_cpu": True, "disable_gradient_checkpointing": True}
    assert lf_config.plan_profile(TrainParams(), runtime, "fp32").base_dtype is None
    plan = lf_config.plan_profile(TrainParams(profile="plain"), BF16_CPU, "fp32")
    assert plan.name == "plain" and plan.keys == {} and plan.batch is None and plan.base_dtype is None


def test_a_users_extra_wins_over_the_cpu_profile_and_the_log_says_so():
    extra = {"flash_attn": "sdpa", "disable_gradient_checkpointing": False}
    sections = config(BF16_CPU, "bf16", extra=extra)
    assert sections["profile"] == {"use_cpu": True} and sections["extra"] == extra
    notes = lf_config.plan_profile(TrainParams(extra=extra), BF16_CPU, "bf16").notes
    assert "train.extra.flash_attn='sdpa' wins over the profile's 'disabled'" in notes


def test_precision_on_a_cpu_follows_its_bf16_unit_and_the_profile():
    from llmft.common import UserError

    choose = lf_config.choose_precision
    assert choose("auto", cuda_available=False, bf16_supported=True, cpu_fast=True) == "bf16"
    assert choose("auto", cuda_available=False, bf16_supported=False, cpu_fast=True) == "fp32"  # falls back
    assert choose("auto", cuda_available=False, bf16_supported=True, cpu_fast=False) == "fp32"  # plain: fp32
    assert choose("fp32", cuda_available=False, bf16_supported=True, cpu_fast=True) == "fp32"  # one key away
    with pytest.raises(UserError, match="this CPU has no bf16 matrix unit"):
        choose("bf16", cuda_available=False, bf16_supported=False, cpu_fast=True)


def test_the_cpu_is_read_as_torch_and_proc_cpuinfo_see_it():
    from llmft.cpu import _cpuinfo_flags, detect_cpu

    isa, flags = detect_cpu(), _cpuinfo_flags()
    if flags:
        assert isa.avx512_bf16 == ("avx512_bf16" in flags) and isa.amx_bf16 == ("amx_bf16" in flags)
    assert isa.bf16 == (isa.avx512_bf16 or isa.amx_bf16)
    assert CpuIsa().describe() == "unknown, no bf16 matrix unit"
    assert CpuIsa(True, True, "AVX512").describe() == "AVX512, amx_bf16, avx512_bf16"


def test_a_dtype_view_loads_the_base_in_bf16_without_copying_it(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from llmft.train import dtype_view

    view = dtype_view(tiny_model_dir, tmp_path / "base", "bfloat16")
    assert all((view / f.name).is_symlink() for f in tiny_model_dir.iterdir() if f.name != "config.json")
    fp32 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="auto")
    bf16 = AutoModelForCausalLM.from_pretrained(view, dtype="auto")  # as LLaMA-Factory loads it
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(fp32.named_parameters(), bf16.named_parameters()):
        assert torch.equal(a.to(torch.bfloat16), b), name
    assert dtype_view(Path("HuggingFaceTB/SmolLM2-135M"), tmp_path / "hub", "bfloat16") == Path(
        "HuggingFaceTB/SmolLM2-135M"
    )


def test_auto_on_cuda_is_fast_sdpa_liger_packing_no_checkpointing():
    sections = gpu_config()
    assert sections["profile"] == {
        "flash_attn": "sdpa",
        "enable_liger_kernel": True,
        "dataloader_num_workers": 2,
        "neat_packing": True,
        "disable_gradient_checkpointing": True,
    }
    # 4 x 4 examples per step, 4 examples per pack -> 4 packs per step, one 2048-token pack per micro-batch
    assert (sections["train"]["per_device_train_batch_size"], sections["train"]["gradient_accumulation_steps"]) == (
        1,
        4,
    )
    plain = gpu_config(profile="plain")  # LLaMA-Factory's defaults on the same GPU
    assert "profile" not in plain and plain["train"]["per_device_train_batch_size"] == 4


def test_flash_attention_2_is_used_where_it_imports_and_packs_one_sequence_per_micro_batch():
    short = (100, 150, 161, 100) * 64  # four examples fill one 512-token pack
    fa2 = Runtime(**{**H100.__dict__, "kernels": frozenset({"flash_attn", "liger_kernel"}), "example_tokens": short})
    sections = gpu_config(fa2, cutoff_len=512)
    assert sections["profile"]["flash_attn"] == "fa2"
    # LLaMA-Factory asserts batch size 1 for neat packing with FlashAttention-2
    assert (sections["train"]["per_device_train_batch_size"], sections["train"]["gradient_accumulation_steps"]) == (
        1,
        4,
    )
    sdpa = gpu_config(Runtime(**{**H100.__dict__, "example_tokens": short}), cutoff_len=512)
    # SDPA takes a packed batch: 2048-token micro-batches keep the GPU busy, so 4 packs of 512 at once
    assert sdpa["profile"]["flash_attn"] == "sdpa"
    assert (sdpa["train"]["per_device_train_batch_size"], sdpa["train"]["gradient_accumulation_steps"]) == (4, 1)


def test_gradient_checkpointing_stays_on_when_the_estimate_does_not_fit():
    small = Runtime(**{**H100.__dict__, "gpu_mem_gib": 22.0})  # e.g. an A10G / L4
    plan = lf_config.plan_profile(TrainParams(cutoff_len=2048), small, "bf16")
    assert "disable_gradient_checkpointing" not in plan.keys
    assert any(n.startswith("gradient checkpointing on: ~") and "over 80% of 22 GiB" in n for n in plan.notes)
    unknown = Runtime(**{**H100.__dict__, "model_config": None})  # a hub id: no config.json to estimate from
    assert (
        "disable_gradient_checkpointing"
        not in lf_config.plan_profile(TrainParams(cutoff_len=2048), unknown, "bf16").keys
    )


def test_keys_set_in_train_extra_win_over_the_profile():
    extra = {
        "flash_attn": "disabled",
        "enable_liger_kernel": False,
        "disable_gradient_checkpointing": False,
        "dataloader_num_workers": 0,
    }
    sections = gpu_config(extra=extra)
    assert sections["profile"] == {"neat_packing": True}
    assert sections["extra"] == extra
    text = lf_config.to_yaml(sections, ["header"])
    for key in extra:  # each key once: LLaMA-Factory reads the YAML with OmegaConf, which rejects duplicates
        assert sum(line.startswith(f"{key}:") for line in text.splitlines()) == 1, key
    no_pack = gpu_config(extra={"neat_packing": False})
    assert "neat_packing" not in no_pack["profile"]
    assert (no_pack["train"]["per_device_train_batch_size"], no_pack["train"]["gradient_accumulation_steps"]) == (4, 4)


def test_packing_is_skipped_where_it_would_change_what_is_learned():
    too_long = Runtime(**{**H100.__dict__, "example_tokens": (300, 2048, 500)})  # packing drops > cutoff_len - 1
    plan = lf_config.plan_profile(TrainParams(cutoff_len=2048), too_long, "bf16")
    assert "neat_packing" not in plan.keys and plan.batch is None
    assert any("packing would drop it, not truncate it" in n for n in plan.notes)
    tiny = Runtime(**{**H100.__dict__, "example_tokens": (30,) * 500})  # one pack = 68 examples > 16 per step
    plan = lf_config.plan_profile(TrainParams(cutoff_len=2048), tiny, "bf16")
    assert "neat_packing" not in plan.keys and any("change the batch" in n for n in plan.notes)
    unknown = Runtime(**{**H100.__dict__, "example_tokens": ()})
    assert "neat_packing" not in lf_config.plan_profile(TrainParams(cutoff_len=2048), unknown, "bf16").keys


def test_pack_count_matches_llamafactory_greedy_knapsack():
    import random

    from llamafactory.data.processor.processor_utils import greedy_knapsack

    rng = random.Random(0)
    for _ in range(20):
        lengths = [rng.randint(1, 600) for _ in range(rng.randint(1, 300))]
        assert profile.greedy_knapsack_count(lengths, 1023) == len(greedy_knapsack(list(lengths), 1023))
    assert profile.count_packs((1000, 1000, 23, 23), 1024, chunk=2) == 2 + 1  # chunks pack on their own


def test_probe_on_a_cpu_reads_only_the_cpu(tmp_path):
    import torch

    from llmft.cpu import detect_cpu

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    # no model, no data: on a CPU the probe must not look for them (the CPU profile needs only the ISA)
    assert profile.probe_runtime(TrainParams(), "nowhere", "smollm2", tmp_path, "fp32") == Runtime(cpu_isa=detect_cpu())


@pytest.mark.slow
def test_fast_profile_yaml_is_accepted_by_llamafactory_parser():
    from llamafactory.hparams.parser import _parse_train_args
    from omegaconf import OmegaConf

    known = lf_config.lf_fields()
    for runtime in (H100, Runtime(**{**H100.__dict__, "kernels": frozenset({"flash_attn", "liger_kernel"})})):
        sections = gpu_config(runtime, extra={"neftune_noise_alpha": 5})
        lf_config.validate(sections, {"neftune_noise_alpha": 5}, known=known)
        text = lf_config.to_yaml(sections, ["llamafactory-cli train train_config.yaml"])
        cfg = OmegaConf.to_container(OmegaConf.create(text))  # as LLaMA-Factory reads it: no duplicate keys
        cfg.pop("bf16")  # TrainingArguments refuses bf16 without a GPU
        model_args, data_args, training_args, *_ = _parse_train_args(cfg | {"report_to": "none"})
        assert data_args.neat_packing and data_args.packing and model_args.enable_liger_kernel
        assert model_args.flash_attn == sections["profile"]["flash_attn"] and model_args.disable_gradient_checkpointing
        assert training_args.per_device_train_batch_size == 1 and training_args.dataloader_num_workers == 2


@pytest.mark.slow
def test_train_stage_on_this_cpu_uses_its_bf16_unit_and_records_the_profile(tiny_model_dir, tmp_path):
    from llmft.cpu import detect_cpu

    make_project(tmp_path, max_steps=3, save_steps=1000, eval_steps=3)  # profile and precision auto
    env = os.environ | {"LLAMAFACTORY_VERBOSITY": "INFO"}
    proc = run_stage(tmp_path, tiny_model_dir, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bf16 = detect_cpu().bf16
    metrics = json.loads((tmp_path / "reports" / "metrics" / "train.json").read_text())
    assert metrics["profile"] == "fast" and metrics["cpu"] == detect_cpu().describe()
    assert metrics["precision"] == ("bf16" if bf16 else "fp32")
    assert metrics["base_dtype"] == ("bfloat16" if bf16 else "as stored")
    assert metrics["global_step"] == 3 and metrics["train_loss"] > 0 and metrics["eval_loss"] > 0
    cfg = yaml.safe_load((tmp_path / "models" / "lora" / "train_config.yaml").read_text())
    assert cfg["disable_gradient_checkpointing"] is True and cfg["use_cpu"] is True
    assert cfg["model_name_or_path"] == str(tiny_model_dir)  # the record names the base itself, not the view
    if bf16:  # LLaMA-Factory's own log: the frozen weights loaded in bf16, autocast on
        assert cfg["bf16"] is True and cfg["flash_attn"] == "disabled"
        assert "compute dtype: torch.bfloat16" in proc.stdout + proc.stderr
        assert "loaded" in (tmp_path / "models/lora/train_config.yaml").read_text().split("###")[0]
