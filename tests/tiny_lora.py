"""A real PEFT LoRA adapter for the tiny model of conftest.py, shared by test_export, test_chat and test_serve.

Import the fixture into a test module (`from tiny_lora import tiny_lora_dir`) to use it there.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def make_lora(model_dir: Path, out: Path, scale: float = 0.05) -> Path:
    """LoRA on every linear layer, lora_B drawn at random (PEFT starts it at zero) so the adapter changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_lora(tiny_model_dir, tmp_path_factory.mktemp("tiny_lora"))
