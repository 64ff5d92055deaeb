"""Running `llamafactory-cli train` for the train stage: the child process, OOM back-off, checkpoints to resume.

sync_checkpoints(Path("checkpoints"), fingerprint(data_dir, model_dir, sections, world_size=2), world_size=2)
ckpt = newest_complete(Path("checkpoints"))     # torn checkpoints (killed mid-save) are removed
ckpt = newest_complete(Path("checkpoints"), fp)  # the other nodes: read only, and only if the fingerprint matches
sections, retries, rc = train_with_backoff(sections, launch, enabled=True)
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from llmft.common import UserError, atomic_write_json, get_logger
from llmft.lf.config import flat

log = get_logger("train")
OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED")
OOM_KNOBS = (
    "lower train.per_device_train_batch_size and raise train.gradient_accumulation_steps, lower "
    "train.cutoff_len, set train.precision bf16/fp16, train.quantization_bit 4 (QLoRA), keep gradient "
    "checkpointing on (no extra.disable_gradient_checkpointing: true), or train.deepspeed z3 on several GPUs"
)
WEIGHTS = (
    "adapter_model.safetensors",
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.bin",
    "pytorch_model.bin",
)


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` can't be resumed, or None. transformers' _save_checkpoint writes the weights, optimizer.pt,
    scheduler.pt and rng_state.pth, then trainer_state.json last; each must also parse (a kill mid-write truncates)."""
    import zipfile

    from safetensors import safe_open

    try:
        json.loads((ckpt / "trainer_state.json").read_text())
        weights = next((ckpt / w for w in WEIGHTS if (ckpt / w).exists()), None)
        if weights is None:
            return "no weights"
        if weights.suffix == ".safetensors":
            with safe_open(weights, "pt") as f:  # reads the header and checks it against the file size
                f.keys()
        if not (ckpt / "latest").exists():  # DeepSpeed keeps optimizer state in global_step*/ instead
            for name in ("optimizer.pt", "scheduler.pt"):  # torch.save writes zips; a truncated zip has no directory
                zipfile.ZipFile(ckpt / name).close()
    except Exception as err:  # any failure to read means "not resumable"
        return f"{type(err).__name__}: {err}"[:120]
    return None


def newest_complete(ckpt_dir: Path, read_only_for: str | None = None) -> Path | None:
    """The newest resumable checkpoint-N; torn ones (killed mid-save) are removed, so no tool ever loads them.

    read_only_for=<fingerprint>: a node other than node 0 looks without removing anything, and only at checkpoints
    stamped with the same fingerprint (node 0 owns the folder; on a shared disk it may be clearing it)."""
    if read_only_for is not None and stamp(ckpt_dir).get("fingerprint") != read_only_for:
        return None
    for ckpt in sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]), reverse=True):
        if (problem := checkpoint_problem(ckpt)) is None:
            return ckpt
        if read_only_for is None:
            log.warning("skipping incomplete %s (%s); removing it", ckpt, problem)
            shutil.rmtree(ckpt)
    return None


def fingerprint(data_dir: Path, model_dir: Path, sections: dict, extra: str = "", world_size: int = 1) -> str:
    """Hash of the data files, model_info.json, the config minus its output path, and `extra` (the rehearsal data
    mixed in). Of the batch only the effective batch counts (per device x accumulation x processes): the OOM
    back-off can resume checkpoints made with a bigger per-device batch, and a checkpoint resumes at another world
    size when the effective batch is the same, because then its steps hold the same examples."""
    cfg = {k: v for k, v in flat(sections).items() if k != "output_dir"}
    cfg["gradient_accumulation_steps"] *= cfg.pop("per_device_train_batch_size") * world_size
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    for f in sorted(data_dir.glob("*.json")) + [model_dir / "model_info.json"]:
        h.update(f.name.encode() + f.read_bytes())
    h.update(extra.encode())
    return h.hexdigest()


def stamp(ckpt_dir: Path) -> dict:
    """checkpoints/fingerprint.json: the fingerprint of the run its checkpoints belong to, and its world size."""
    path = ckpt_dir / "fingerprint.json"
    return json.loads(path.read_text()) if path.exists() else {}


def sync_checkpoints(ckpt_dir: Path, fp: str, world_size: int = 1, effective_batch: int | None = None) -> None:
    """Keep checkpoints made from the same inputs; otherwise clear them, in one log line that says why."""
    old = stamp(ckpt_dir)
    old_world = old.get("world_size", 1)
    if old.get("fingerprint") != fp and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        n = len(list(ckpt_dir.glob("checkpoint-*")))
        if old_world != world_size and old.get("effective_batch") not in (None, effective_batch):
            log.info(
                "world size %d -> %d changed the effective batch %s -> %s since %s was written, so a step no longer "
                "holds the same examples: starting fresh (removing %d checkpoints)",
                old_world,
                world_size,
                old["effective_batch"],
                effective_batch,
                ckpt_dir,
                n,
            )
        else:
            log.info(
                "data, model or train params changed since %s was written: starting fresh (removing %d checkpoints)",
                ckpt_dir,
                n,
            )
        for entry in ckpt_dir.iterdir():  # empty it, don't remove it: on Colab it is a symlink to Google Drive
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    elif old_world != world_size and any(ckpt_dir.glob("checkpoint-*")):
        log.info(
            "checkpoints in %s were written at world size %d, this run has %d: the same effective batch (%s), so "
            "they resume",
            ckpt_dir,
            old_world,
            world_size,
            effective_batch,
        )
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        ckpt_dir / "fingerprint.json",
        {"fingerprint": fp, "world_size": world_size, "effective_batch": effective_batch},
    )


def run_child(cmd: list[str], env: dict, cwd: Path) -> tuple[int, str]:
    """Run with stderr passed through live (progress bars stay) and its last 64 KB kept to spot an OOM."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stderr=subprocess.PIPE)
    tail: collections.deque[bytes] = collections.deque(maxlen=64)

    def pump() -> None:
        while chunk := os.read(proc.stderr.fileno(), 1024):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail.append(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C): leave no trainer running
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    return rc, b"".join(tail).decode(errors="replace")


def backoff(batch: int, accumulation: int) -> tuple[int, int] | None:
    """The next smaller per-device batch with the same effective batch (halve when even); None at batch 1."""
    if batch <= 1:
        return None
    smaller = max(d for d in range(1, batch) if batch % d == 0)
    return smaller, accumulation * (batch // smaller)


def train_with_backoff(sections: dict, launch: Callable[[dict], tuple[int, str]], enabled: bool):
    """Launch; on a CUDA OOM first turn gradient checkpointing back on if the fast profile turned it off (its
    memory estimate was short), then halve the per-device batch and double accumulation, down to batch 1.

    Returns (sections that ran last, OOM retries, exit code). Out of options: a UserError naming the knobs.
    """
    retries = 0
    while True:
        rc, stderr = launch(sections)
        if rc == 0 or not OOM.search(stderr):
            return sections, retries, rc
        if enabled and sections.get("profile", {}).pop("disable_gradient_checkpointing", None):
            log.warning("CUDA out of memory without gradient checkpointing (train.profile fast): retrying with it on")
            retries += 1
            continue
        train = sections["train"]
        batch, accum = train["per_device_train_batch_size"], train["gradient_accumulation_steps"]
        smaller = backoff(batch, accum) if enabled else None
        if smaller is None:
            raise UserError(
                f"CUDA out of memory at per_device_train_batch_size={batch}, gradient_accumulation_steps="
                f"{accum}{'' if enabled else ' (train.oom_backoff is off)'}: {OOM_KNOBS}"
            )
        log.warning(
            "CUDA out of memory at batch %d x accumulation %d: retrying with %d x %d (same effective batch)",
            batch,
            accum,
            *smaller,
        )
        train["per_device_train_batch_size"], train["gradient_accumulation_steps"] = smaller
        retries += 1


def live_rows(history: list[Mapping[str, Any]]) -> dict[str, str]:
    """trainer_state.json log_history -> DVCLive's plots/metrics/*.tsv files, named as its HF callback names them
    (loss, learning_rate, eval/loss, ...), with step = the optimizer step."""
    rows: dict[str, list[str]] = {}
    for entry in history:
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)):
                name = key.replace("train_", "train/").replace("eval_", "eval/")  # as dvclive's HF callback
                rows.setdefault(name, [f"step\t{name.rsplit('/', 1)[-1]}"]).append(f"{entry['step']}\t{value}")
    return {f"{name}.tsv": "\n".join(lines) + "\n" for name, lines in rows.items()}
