"""One arm of perf/perf_train.py: the Runtime the profile plans for, the arm's LLaMA-Factory config built as the
train stage builds it, and a fresh process that trains it (perf_train.py --worker, perf_train_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from llmft.lf import config as lf_config
from llmft.lf.profile import Runtime, plan_profile
from llmft.params import TrainParams
from llmft.train import dtype_view
from perf_train_setup import TEMPLATE

ENTRY = Path(__file__).with_name("perf_train.py")  # the arm's process runs its --worker


def liger_works() -> str | None:
    """None when Liger's kernels run a tiny Llama forward + backward on this GPU, else why not."""
    try:
        import torch
        from liger_kernel.transformers import (
            LigerRMSNorm,
            apply_liger_kernel_to_llama,  # noqa: F401
        )

        norm = LigerRMSNorm(64).cuda().to(torch.bfloat16)
        x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        norm(x).sum().backward()
        return None
    except Exception as err:  # any failure means: benchmark without Liger, and say why
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"


def runtime_here(cuda: bool, shape: dict, model_dir: Path, lengths: list[int], isa, notes: list[str]) -> Runtime:
    """This machine as the profile sees it: its kernels (a note when Liger fails), memory, CPUs, and the workload."""
    import torch

    kernels = set()
    if cuda:
        from transformers.utils import is_flash_attn_2_available

        kernels |= {"flash_attn"} if is_flash_attn_2_available() else set()
        if why := liger_works():
            notes.append(f"no Liger kernels: {why}")
        else:
            kernels.add("liger_kernel")
    return Runtime(
        cuda=cuda,
        gpu_mem_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0,
        kernels=frozenset(kernels),
        cpu_count=len(os.sched_getaffinity(0)),
        model_config=shape,
        weights_bytes=sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
        example_tokens=tuple(lengths),
        cpu_isa=isa or Runtime().cpu_isa,
    )


def arm_sections(arm: str, args, model_dir: Path, data_dir: Path, out_dir: Path, precision: str, runtime, steps: int):
    """The LLaMA-Factory config of one arm, built by lf_config.build_config as the train stage builds it."""

    extra = {"disable_shuffling": True, "preprocessing_batch_size": args.per_pack}
    if arm == "fast-gc":
        extra["disable_gradient_checkpointing"] = False
    t = TrainParams(
        profile="plain" if arm == "plain" else "fast",
        lora_rank=args.lora_rank,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum,
        learning_rate=args.lr,
        max_steps=steps,
        cutoff_len=args.cutoff_len,
        logging_steps=1,
        seed=args.seed,
        extra=extra,
    )
    sections = lf_config.build_config(
        t,
        model_path=str(model_dir),
        template=TEMPLATE,
        trust_remote_code=False,
        data_dir=str(data_dir),
        output_dir=str(out_dir),
        precision=precision,
        runtime=runtime,
    )
    plan = plan_profile(t, runtime, precision)
    if plan.base_dtype:  # what the train stage launches: the base loaded in bf16 (training.dtype_view)
        view = dtype_view(model_dir, out_dir.parent / f"model-{plan.base_dtype}", plan.base_dtype)
        sections["model"]["model_name_or_path"] = str(view)
    # Benchmark only: no evaluation, checkpoints, reports or progress bars.
    del sections["dataset"]["eval_dataset"]
    sections["eval"] = {"eval_strategy": "no"}
    sections["output"] |= {
        "overwrite_output_dir": True,
        "save_strategy": "no",
        "report_to": "none",
        "plot_loss": False,
        "include_effective_tokens_per_second": False,
        "disable_tqdm": True,
    }
    return sections, plan


def run_arm(arm: str, sections: dict, work: Path, timeout: int) -> dict:
    """Train one arm in a fresh process (python perf_train.py --worker spec.json); its records."""

    spec = {"args": lf_config.flat(sections), "out": str(work / f"{arm}.result.json")}
    (work / f"{arm}.yaml").write_text(
        lf_config.to_yaml(
            sections,
            [f"llamafactory-cli train {arm}.yaml  (benchmark arm {arm}; written by perf/perf_train.py)"],
        )
    )
    (work / f"{arm}.spec.json").write_text(json.dumps(spec))
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "WANDB_DISABLED": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_CACHE": str(work / "hf_cache"),
        "DISABLE_VERSION_CHECK": "1",
    }
    log = work / f"{arm}.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, str(ENTRY), "--worker", str(work / f"{arm}.spec.json")],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    if proc.returncode:
        sys.exit(f"arm {arm} failed (exit {proc.returncode}); the end of {log}:\n{log.read_text()[-4000:]}")
    result = json.loads(Path(spec["out"]).read_text())
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result
