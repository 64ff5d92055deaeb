"""train.profile (src/llmft/lf/profile.py): what fast adds, where, and when not.

Fast tests feed plan_profile / build_config a simulated machine (profile.Runtime: CUDA or not, GPU memory,
which kernels import) and check the keys; one checks the YAML with LLaMA-Factory's own argument parser. The
slow test runs the real train stage with `profile: fast` on a CPU (packing only) on the tiny model. The
learning comparison plain vs fast, same examples per step, is in tests/test_bench.py.
"""

from __future__ import annotations

import json

import pytest
import yaml

from lf_configs import H100, config, gpu_config
from llmft.lf import config as lf_config
from llmft.lf import profile
from llmft.lf.profile import CPU, Runtime
from llmft.params import TrainParams
from train_project import make_project, run_stage


def test_auto_on_a_cpu_changes_nothing():
    plain = config(profile="plain")
    assert config() == plain and "profile" not in plain
    # whatever the CPU machine has installed or the data look like
    assert (
        config(Runtime(kernels=frozenset({"liger_kernel", "flash_attn"}), cpu_count=64, example_tokens=(40,) * 100))
        == plain
    )
    plan = lf_config.plan_profile(TrainParams(), Runtime(), "fp32")
    assert plan.name == "plain" and plan.keys == {} and plan.batch is None


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


def test_fast_forced_on_a_cpu_only_packs():
    sections = config(
        Runtime(example_tokens=(60, 50, 70, 74) * 40), profile="fast", cutoff_len=256, gradient_accumulation_steps=4
    )
    assert sections["profile"] == {"neat_packing": True}
    assert (sections["train"]["per_device_train_batch_size"], sections["train"]["gradient_accumulation_steps"]) == (
        4,
        1,
    )


def test_pack_count_matches_llamafactory_greedy_knapsack():
    import random

    from llamafactory.data.processor.processor_utils import greedy_knapsack

    rng = random.Random(0)
    for _ in range(20):
        lengths = [rng.randint(1, 600) for _ in range(rng.randint(1, 300))]
        assert profile.greedy_knapsack_count(lengths, 1023) == len(greedy_knapsack(list(lengths), 1023))
    assert profile.count_packs((1000, 1000, 23, 23), 1024, chunk=2) == 2 + 1  # chunks pack on their own


def test_probe_on_a_cpu_with_auto_reads_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    # no model, no data: with auto on a CPU the probe must not look for them (the plain profile needs nothing)
    assert profile.probe_runtime(TrainParams(), "nowhere", "smollm2", tmp_path, "fp32") == CPU


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
def test_train_stage_with_profile_fast_on_a_cpu_packs_and_trains(tiny_model_dir, tmp_path):
    # All 18 train examples (max_samples None) and save_steps at its default: train_project.TRAIN overridden.
    make_project(tmp_path, profile="fast", max_steps=3, max_samples=None, cutoff_len=256, save_steps=1000, eval_steps=3)
    proc = run_stage(tmp_path, tiny_model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.profile fast: neat_packing=True" in proc.stderr
    cfg = yaml.safe_load((tmp_path / "models" / "lora" / "train_config.yaml").read_text())
    # ~5 examples of ~50 tokens fill a 256-token pack: 2 x 2 examples per step -> 1 pack per step
    assert cfg["neat_packing"] is True and (cfg["per_device_train_batch_size"], cfg["gradient_accumulation_steps"]) == (
        1,
        1,
    )
    assert cfg["disable_gradient_checkpointing"] is True  # fp32 on a CPU, as without the profile
    metrics = json.loads((tmp_path / "reports" / "metrics" / "train.json").read_text())
    assert metrics["global_step"] == 3 and metrics["train_loss"] > 0 and metrics["eval_loss"] > 0
