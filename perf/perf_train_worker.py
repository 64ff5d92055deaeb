"""Inside one arm's process: LLaMA-Factory's run_exp, every optimizer step timed and its real tokens counted.

python perf/perf_train.py --worker <work>/<arm>.spec.json    # what perf_train_arm.run_arm starts
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from llmft.common import atomic_write_json


def real_tokens(batch) -> int:
    """Non-pad tokens of one micro-batch: from a 2D mask, from the diagonal of LLaMA-Factory's 4D packing mask
    (a real token attends to itself, a pad to nothing), or every token of an unpadded FlashAttention batch."""
    import torch

    mask = batch.get("attention_mask")
    if mask is None:
        return int(batch["input_ids"].numel())
    if mask.dim() == 2:
        return int((mask != 0).sum())
    diag = torch.diagonal(mask[:, 0], dim1=-2, dim2=-1)
    return int(diag.sum() if diag.dtype == torch.bool else (diag == 0).sum())


def worker(spec_path: str) -> int:
    """Inside the arm's process: LLaMA-Factory's run_exp with a callback timing every optimizer step."""
    import torch
    from llamafactory.train.tuner import run_exp

    spec = json.loads(Path(spec_path).read_text())
    cuda = torch.cuda.is_available()
    counts: list[tuple[int, int, int]] = []
    record: dict = {"steps": []}
    count_batches(counts)
    run_exp(args=spec["args"], callbacks=[step_timer(record, counts, cuda)])
    record |= peak_memory(cuda)
    atomic_write_json(spec["out"], record)
    return 0


def count_batches(counts: list[tuple[int, int, int]]) -> None:
    """Append (real tokens, label tokens, micro-batches) of every optimizer step to `counts`, as the Trainer
    fetches the step's micro-batches."""
    import transformers

    get_batch_samples = transformers.Trainer.get_batch_samples

    def counting(self, epoch_iterator, num_batches, device):  # one call per optimizer step: its micro-batches
        batches, n = get_batch_samples(self, epoch_iterator, num_batches, device)
        counts.append(
            (sum(real_tokens(b) for b in batches), sum(int((b["labels"] != -100).sum()) for b in batches), len(batches))
        )
        return batches, n

    transformers.Trainer.get_batch_samples = counting


def step_timer(record: dict, counts: list[tuple[int, int, int]], cuda: bool):
    """A TrainerCallback that writes each step's seconds, counts, loss and grad norm, and the model's kernels and
    batch layout, into `record`."""
    import torch
    from transformers import TrainerCallback

    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            record.update(
                attn_implementation=base.config._attn_implementation,
                gradient_checkpointing=bool(base.is_gradient_checkpointing),
                liger=type(base.model.norm).__name__.startswith("Liger"),
                micro_batch=args.per_device_train_batch_size,
                accumulation=args.gradient_accumulation_steps,
            )
            sync()
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            now = time.perf_counter()
            tokens, labels, micro = counts.pop(0)
            record["steps"].append(
                {
                    "step": state.global_step,
                    "seconds": now - self.last,
                    "real_tokens": tokens,
                    "label_tokens": labels,
                    "micro_batches": micro,
                }
            )
            self.last = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and record["steps"] and record["steps"][-1]["step"] == state.global_step:
                record["steps"][-1] |= {"loss": logs["loss"], "grad_norm": logs.get("grad_norm")}

    return StepTimer()


def peak_memory(cuda: bool) -> dict:
    """The arm's peak memory: GPU max allocated (and reserved), or the process's max RSS on a CPU."""
    import resource

    import torch

    if cuda:
        return {
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "memory": "GPU max allocated",
        }
    return {"peak_mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "memory": "max RSS"}
