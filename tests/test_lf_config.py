"""params.train -> LLaMA-Factory config (src/llmft/lf/config.py): house-style YAML, validation, precision, launch."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from lf_configs import config
from llmft.common import UserError
from llmft.lf import config as lf_config
from llmft.lf.world import World
from scripts import ROOT


def test_precision_auto_is_bf16_then_fp16_then_fp32():
    assert lf_config.choose_precision("auto", cuda_available=True, bf16_supported=True) == "bf16"
    assert lf_config.choose_precision("auto", cuda_available=True, bf16_supported=False) == "fp16"  # a Colab T4
    assert lf_config.choose_precision("auto", cuda_available=False, bf16_supported=False) == "fp32"
    assert lf_config.choose_precision("fp32", cuda_available=True, bf16_supported=True) == "fp32"


def test_forced_precision_the_device_lacks_says_what_to_use():
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        lf_config.choose_precision("fp16", cuda_available=False, bf16_supported=False)
    with pytest.raises(UserError, match="no bf16 support.*use fp16"):
        lf_config.choose_precision("bf16", cuda_available=True, bf16_supported=False)


def test_config_is_llamafactory_house_style_yaml():
    sections = config(use_dora=True, quantization_bit=4, extra={"gradient_checkpointing": True}, profile="plain")
    text = lf_config.to_yaml(sections, ["llamafactory-cli train models/lora/train_config.yaml"])
    assert text.startswith("# llamafactory-cli train models/lora/train_config.yaml\n")
    assert [line for line in text.splitlines() if line.startswith("###")] == [
        "### model",
        "### method",
        "### dataset",
        "### output",
        "### train",
        "### eval",
        "### extra",
    ]
    cfg = yaml.safe_load(text)
    assert cfg == lf_config.flat(sections)
    assert cfg["use_dora"] is True and cfg["quantization_bit"] == 4 and cfg["gradient_checkpointing"] is True
    assert cfg["report_to"] == "dvclive" and cfg["overwrite_output_dir"] is False and cfg["eval_dataset"] == "val"
    assert "bf16" not in cfg and "fp16" not in cfg  # fp32


def test_extra_keys_that_break_the_stage_or_duplicate_a_typed_key_are_rejected():
    known = set(lf_config.flat(config())) | {"neftune_noise_alpha"}
    lf_config.validate(config(extra={"neftune_noise_alpha": 5}), {"neftune_noise_alpha": 5}, known=known)
    with pytest.raises(UserError, match="train.extra.overwrite_output_dir: set by the train stage"):
        lf_config.validate(config(), {"overwrite_output_dir": True}, known=known)
    with pytest.raises(UserError, match="use train.lora_rank instead"):
        lf_config.validate(config(), {"lora_rank": 4}, known=known, typed={"lora_rank"})
    with pytest.raises(UserError, match="train.extra.neftune_alpha: not a LLaMA-Factory .*'neftune_noise_alpha'"):
        lf_config.validate(config(extra={"neftune_alpha": 5}), {"neftune_alpha": 5}, known=known)


def test_launch_is_plain_llamafactory_cli_on_one_gpu():
    cmd, env = lf_config.launch_command("/run/cfg.yaml", {"PATH": "/usr/bin"}, World().launch_env(), "/venv/bin")
    assert cmd == ["/venv/bin/llamafactory-cli", "train", "/run/cfg.yaml"]
    assert "FORCE_TORCHRUN" not in env and env["PATH"] == f"/venv/bin{os.pathsep}/usr/bin"
    assert env["NPROC_PER_NODE"] == "1"  # LF would otherwise start one process per GPU by itself


def test_deepspeed_and_multinode_launches_force_torchrun_and_set_the_rendezvous_env():
    _, env = lf_config.launch_command("c.yaml", {"PATH": "/usr/bin"}, World().launch_env(deepspeed=True), "/venv/bin")
    assert env["FORCE_TORCHRUN"] == "1"
    node1 = World(nnodes=2, nproc=1, node_rank=1, master_addr="10.0.0.1", master_port=29500, rdzv_timeout=60)
    _, env = lf_config.launch_command("c.yaml", {"PATH": "/usr/bin", "NODE_RANK": "1"}, node1.launch_env(), "/bin")
    assert {k: env[k] for k in ("FORCE_TORCHRUN", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "FORCE_TORCHRUN": "1",
        "NNODES": "2",
        "NODE_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }
    assert env["PET_RDZV_CONF"] == "timeout=60"  # torchrun's own wait for the other nodes, bounded
    for z in ("z2", "z3"):
        ds = json.loads((ROOT / lf_config.DEEPSPEED_CONFIGS[z]).read_text())
        assert ds["zero_optimization"]["stage"] == int(z[1]) and ds["train_micro_batch_size_per_gpu"] == "auto"


@pytest.mark.slow
def test_every_generated_key_is_a_llamafactory_argument():
    known = lf_config.lf_fields()
    for train in ({}, {"finetuning_type": "full"}, {"quantization_bit": 4, "use_dora": True, "use_rslora": True}):
        lf_config.validate(config(**train), {}, known=known)
    sections = config()
    sections["method"]["deepspeed"] = "configs/deepspeed/ds_z3.json"
    lf_config.validate(sections, {}, known=known)
