"""The train stage's data: data/processed's train split, with the rehearse stage's answers mixed in by LLaMA-Factory.

    mix = plan_mix(Path("data/processed"), Path("data/rehearsal"), params.rehearsal, params.train.max_samples)
    sections["dataset"] |= mix.dataset_keys(record_dir="models/lora")   # dataset: train,rehearsal; mix_strategy
    write_dataset_info(mix.info, run_dir)                                 # where LLaMA-Factory reads it

LLaMA-Factory mixes datasets itself: `dataset: train,rehearsal` with `mix_strategy: concat`, and `num_samples` in
the rehearsal's dataset_info entry draws that many of its examples (repeating them when it holds fewer). So
rehearsal.share of the examples of an epoch are rehearsal, and the trainer's shuffling spreads them over the steps:
each step holds that share on average. Every one of the user's examples is trained on once per epoch, however
small the rehearsal set. Not interleave_probs: `interleave_under` stops at the first dataset to run out (a small
rehearsal set would silently cut the user's own examples) and `interleave_over` repeats the user's examples
until the rehearsal set is used up (LLaMA-Factory itself recommends concat for non-streaming data).

LLaMA-Factory reads one dataset_info.json from one dataset_dir, and the two sets are the outputs of two stages
(data/processed, data/rehearsal). So the train stage writes a dataset_info.json naming both: absolute paths next to
the config it launches, relative ones in models/lora next to train_config.yaml, which reruns the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from llmft.common import UserError, read_json, write_json
from llmft.params import RehearsalParams

NAME = "rehearsal"  # the rehearse stage's dataset name in its dataset_info.json, and in `dataset: train,rehearsal`


def rehearsal_samples(train_examples: int, share: float) -> int:
    """How many rehearsal examples make them `share` of an epoch of `train_examples` of the user's own."""
    return max(1, round(share / (1 - share) * train_examples))


@dataclasses.dataclass
class Mix:
    info: dict  # dataset_info.json entries; file_name relative to the current directory (the repo root)
    train_examples: int  # the user's examples per epoch
    samples: int  # rehearsal examples per epoch (LLaMA-Factory's num_samples)
    available: int  # rehearsal examples the rehearse stage wrote

    def dataset_keys(self, record_dir: str) -> dict:
        """The train config's dataset keys; dataset_dir is where the recorded dataset_info.json will be."""
        return {"dataset_dir": record_dir, "dataset": f"train,{NAME}", "mix_strategy": "concat"}


def plan_mix(data_dir: Path, rehearsal_dir: Path, r: RehearsalParams, max_samples: int | None) -> Mix | None:
    """The mix of this run, or None when rehearsal is off. UserError when the rehearse stage's output is missing."""
    if not r.enabled:
        return None
    info_file = rehearsal_dir / "dataset_info.json"
    if not info_file.exists():
        raise UserError(f"{info_file} not found though rehearsal.enabled is true: run `dvc repro rehearse` first")
    rehearsal_info = read_json(info_file)
    available = len(read_json(rehearsal_dir / rehearsal_info[NAME]["file_name"]))
    if not available:
        raise UserError(
            f"{rehearsal_dir} holds no rehearsal examples though rehearsal.enabled is true: rerun "
            "`dvc repro rehearse` (it writes none when rehearsal.enabled is false)"
        )
    processed = read_json(data_dir / "dataset_info.json")
    train = len(read_json(data_dir / processed["train"]["file_name"]))
    train = min(train, max_samples or train)
    samples = rehearsal_samples(train, r.share)
    if max_samples:  # LLaMA-Factory cuts each dataset to max_samples, after drawing num_samples
        samples = min(samples, max_samples)
    info = {name: entry | {"file_name": str(data_dir / entry["file_name"])} for name, entry in processed.items()}
    entry = rehearsal_info[NAME]
    info[NAME] = entry | {"file_name": str(rehearsal_dir / entry["file_name"]), "num_samples": samples}
    return Mix(info, train, samples, available)


def write_dataset_info(info: dict, where: Path, relative_to: Path | None = None) -> Path:
    """where/dataset_info.json with the entries' files as absolute paths, or relative to `relative_to` (the folder
    the file ends up in: `where` may be a temporary folder of another depth, renamed into place later)."""

    def located(file: str) -> str:
        return os.path.relpath(file, relative_to) if relative_to else os.path.abspath(file)

    entries = {name: entry | {"file_name": located(entry["file_name"])} for name, entry in info.items()}
    write_json(where / "dataset_info.json", entries)
    return where / "dataset_info.json"


def describe(mix: Mix) -> str:
    share = mix.samples / (mix.samples + mix.train_examples)
    repeat = f"; LLaMA-Factory repeats some of the {mix.available}" if mix.samples > mix.available else ""
    return (
        f"rehearsal: {mix.samples} of the base model's own answers ({mix.available} available{repeat}) mixed with "
        f"your {mix.train_examples} training examples: {100 * share:.0f}% of each epoch"
    )


def fingerprint_extra(mix: Mix | None) -> str:
    """What the checkpoints' fingerprint must also cover: the rehearsal data and how much of it is drawn."""
    if mix is None:
        return ""
    return json.dumps(mix.info[NAME], sort_keys=True) + Path(mix.info[NAME]["file_name"]).read_text(encoding="utf-8")
