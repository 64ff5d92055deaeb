"""Simulated machines and LLaMA-Factory configs for the tests of src/llmft/lf (no GPU exists here).

from lf_configs import H100, LLAMA_7B, config, gpu_config
"""

from __future__ import annotations

from llmft.lf import config as lf_config
from llmft.lf.profile import CPU, Runtime
from llmft.params import TrainParams

LLAMA_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "dtype": "bfloat16",
}


H100 = Runtime(
    cuda=True,
    gpu_mem_gib=79.2,
    kernels=frozenset({"liger_kernel"}),
    cpu_count=16,
    model_config=LLAMA_7B,
    weights_bytes=13_476_839_424,
    example_tokens=(300, 700, 500, 547) * 64,
)  # four examples fill one 2048-token pack exactly


def config(runtime: Runtime = CPU, precision: str = "fp32", **train) -> dict:
    return lf_config.build_config(
        TrainParams(**train),
        model_path="models/base",
        template="smollm2",
        trust_remote_code=False,
        data_dir="data/processed",
        output_dir="checkpoints",
        precision=precision,
        runtime=runtime,
    )


# The guide's values for a 7B model on thousands of examples on a GPU (docs/training.md); the schema's defaults
# are the CPU demo's (params.yaml).
GUIDE_7B = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4, "learning_rate": 5e-5}


def gpu_config(runtime: Runtime = H100, **train) -> dict:
    return config(runtime, "bf16", **(GUIDE_7B | {"cutoff_len": 2048} | train))
