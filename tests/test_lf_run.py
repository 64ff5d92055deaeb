"""Running llamafactory-cli (src/llmft/lf/run.py): the OOM back-off (a fake launcher: no GPU exists here),
what counts as a complete checkpoint, and the fingerprint that decides when to start fresh.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lf_configs import config, gpu_config
from llmft.common import UserError
from llmft.lf import run as lf_run


def fake_launcher(oom_above: int, calls: list):
    """Stands in for llamafactory-cli: OOMs like CUDA does while the per-device batch is above `oom_above`."""

    def launch(sections):
        batch = sections["train"]["per_device_train_batch_size"]
        calls.append((batch, sections["train"]["gradient_accumulation_steps"]))
        if batch > oom_above:
            return 1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
        return 0, ""

    return launch


def test_cuda_oom_halves_batch_and_doubles_accumulation_until_it_fits():
    """A GPU can't exist here, so a fake launcher plays the OOMing child."""
    calls: list = []
    start = config(per_device_train_batch_size=8, gradient_accumulation_steps=2, profile="plain")
    sections, retries, rc = lf_run.train_with_backoff(start, fake_launcher(2, calls), enabled=True)
    assert rc == 0 and retries == 2 and calls == [(8, 2), (4, 4), (2, 8)]
    assert sections["train"]["per_device_train_batch_size"] * sections["train"]["gradient_accumulation_steps"] == 16
    assert lf_run.backoff(6, 1) == (3, 2) and lf_run.backoff(3, 2) == (1, 6) and lf_run.backoff(1, 4) is None


def test_oom_at_batch_one_or_with_backoff_off_names_the_knobs():
    for train, enabled in (({"per_device_train_batch_size": 2}, True), ({}, False)):
        with pytest.raises(UserError, match="CUDA out of memory.*cutoff_len.*QLoRA.*gradient checkpointing.*deepspeed"):
            lf_run.train_with_backoff(config(**train), fake_launcher(0, []), enabled=enabled)


def test_a_crash_that_is_not_an_oom_is_not_retried():
    calls: list = []
    _, retries, rc = lf_run.train_with_backoff(config(), lambda s: (calls.append(1), (3, "KeyError: 'x'"))[1], True)
    assert (rc, retries, calls) == (3, 0, [1])


def fake_checkpoint(path: Path, step: int) -> Path:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, path / "adapter_model.safetensors")
    torch.save({"state": {}}, path / "optimizer.pt")
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_a_checkpoint_torn_mid_save_is_skipped_and_removed(tmp_path):
    good = fake_checkpoint(tmp_path / "checkpoint-2", 2)
    no_state = fake_checkpoint(tmp_path / "checkpoint-4", 4)
    (no_state / "trainer_state.json").unlink()  # killed before transformers wrote it (it goes last)
    cut = fake_checkpoint(tmp_path / "checkpoint-6", 6)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # killed while the weights were being written
    bad_optimizer = fake_checkpoint(tmp_path / "checkpoint-8", 8)
    (bad_optimizer / "optimizer.pt").write_bytes((bad_optimizer / "optimizer.pt").read_bytes()[:100])
    assert lf_run.checkpoint_problem(good) is None
    assert all(lf_run.checkpoint_problem(c) for c in (no_state, cut, bad_optimizer))
    assert lf_run.newest_complete(tmp_path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_fingerprint_ignores_output_path_and_batch_split_but_not_params_or_data(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("[]")
    (tmp_path / "model_info.json").write_text("{}")
    fp = lambda sections: lf_run.fingerprint(tmp_path / "data", tmp_path, sections)
    base = fp(config())
    moved = config()
    moved["output"]["output_dir"] = "elsewhere"
    assert fp(moved) == base == fp(config(per_device_train_batch_size=2, gradient_accumulation_steps=2))
    assert fp(config(learning_rate=1e-4)) != base
    (tmp_path / "data" / "train.json").write_text("[{}]")
    assert fp(config()) != base


def test_an_oom_without_gradient_checkpointing_first_turns_it_back_on():
    calls = []

    def launch(sections):  # a GPU whose memory the estimate overrated: fits only with checkpointing
        calls.append((sections["train"]["per_device_train_batch_size"], dict(sections.get("profile", {}))))
        if sections["profile"].get("disable_gradient_checkpointing"):
            return 1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
        return 0, ""

    sections, retries, rc = lf_run.train_with_backoff(gpu_config(), launch, enabled=True)
    assert rc == 0 and retries == 1 and [batch for batch, _ in calls] == [1, 1]
    assert "disable_gradient_checkpointing" not in sections["profile"] and sections["profile"]["neat_packing"]
