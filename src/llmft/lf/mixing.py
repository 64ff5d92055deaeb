"""The train stage's data: data/processed's train split, with the rehearse stage's answers mixed in by LLaMA-Factory.

    mix = plan_mix(Path("data/processed"), Path("data/rehearsal"), params.rehearse, params.train.max_samples)
    sections["dataset"] |= mix.dataset_keys(record_dir="models/lora")   # dataset: train,rehearsal; mix_strategy
    write_dataset_info(mix.info, run_dir)                                 # where LLaMA-Factory reads it

LLaMA-Factory mixes datasets itself: `dataset: train,rehearsal` with `mix_strategy: concat`, and `num_samples` in
the rehearsal's dataset_info entry draws that many of its examples. So rehearse.share of the examples of an
epoch are rehearsal, and the trainer's shuffling spreads them over the steps: each step (and so any run the CPU
budget cuts short) holds that share on average. Every one of the user's examples is trained on once per epoch.

No rehearsal answer is drawn more than rehearse.max_repeats times an epoch: a large table asking for 962 rehearsal
rows of a pool of 105 would otherwise teach each answer by heart (about nine times an epoch), the opposite of
rehearsal. When the pool is too small for the share, the share comes down, and one line says so. LLaMA-Factory draws
`num_samples` without replacement only up to the pool's size (past it, `np.random.choice` repeats at random), so a
mix that needs repeats lists the same file under several names (rehearsal, rehearsal_2, ...), each drawing at most
the whole pool once: an answer appears at most once per entry.

Not interleave_probs: `interleave_under` stops at the first dataset to run out (a small rehearsal set would
silently cut the user's own examples) and `interleave_over` repeats the user's examples until the rehearsal set
is used up (LLaMA-Factory itself recommends concat for non-streaming data).

LLaMA-Factory reads one dataset_info.json from one dataset_dir, and the two sets are the outputs of two stages
(data/processed, data/rehearsal). So the train stage writes a dataset_info.json naming both: absolute paths next to
the config it launches, relative ones in models/lora next to train_config.yaml, which reruns the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from llmft.common import UserError, read_json, write_json
from llmft.params import RehearseParams

NAME = "rehearsal"  # the rehearse stage's dataset name in its dataset_info.json, and in `dataset: train,rehearsal`


def rehearsal_samples(train_examples: int, share: float) -> int:
    """How many rehearsal examples make them `share` of an epoch of `train_examples` of the user's own."""
    return max(1, round(share / (1 - share) * train_examples))


def entry_names(samples: int, available: int) -> list[str]:
    """The dataset names that draw `samples` of a pool of `available`, each at most the whole pool once."""
    return [NAME if i == 0 else f"{NAME}_{i + 1}" for i in range(math.ceil(samples / available))]


@dataclasses.dataclass
class Mix:
    info: dict  # dataset_info.json entries; file_name relative to the current directory (the repo root)
    train_examples: int  # the user's examples per epoch
    samples: int  # rehearsal examples per epoch (LLaMA-Factory's num_samples, over all rehearsal entries)
    available: int  # rehearsal examples the rehearse stage wrote
    asked: int = 0  # what rehearse.share asked for, before rehearse.max_repeats capped it
    max_repeats: int = 1

    @property
    def share(self) -> float:
        return self.samples / (self.samples + self.train_examples)

    @property
    def repeats(self) -> int:
        """The most times one rehearsal answer is drawn in an epoch."""
        return math.ceil(self.samples / self.available)

    def dataset_keys(self, record_dir: str) -> dict:
        """The train config's dataset keys; dataset_dir is where the recorded dataset_info.json will be."""
        names = ",".join(entry_names(self.samples, self.available))
        return {"dataset_dir": record_dir, "dataset": f"train,{names}", "mix_strategy": "concat"}


def plan_mix(data_dir: Path, rehearsal_dir: Path, r: RehearseParams, max_samples: int | None) -> Mix | None:
    """The mix of this run, or None when rehearsal is off. UserError when the rehearse stage's output is missing."""
    if not r.enabled:
        return None
    info_file = rehearsal_dir / "dataset_info.json"
    if not info_file.exists():
        raise UserError(f"{info_file} not found though rehearse.enabled is true: run `dvc repro rehearse` first")
    rehearsal_info = read_json(info_file)
    available = len(read_json(rehearsal_dir / rehearsal_info[NAME]["file_name"]))
    if not available:
        raise UserError(
            f"{rehearsal_dir} holds no rehearsal examples though rehearse.enabled is true: rerun "
            "`dvc repro rehearse` (it writes none when rehearse.enabled is false)"
        )
    processed = read_json(data_dir / "dataset_info.json")
    train = len(read_json(data_dir / processed["train"]["file_name"]))
    train = min(train, max_samples or train)
    asked = rehearsal_samples(train, r.share)
    samples = min(asked, available * r.max_repeats)
    if max_samples:  # LLaMA-Factory cuts each dataset to max_samples, after drawing num_samples
        samples = min(samples, max_samples)
    info = processed_entries(data_dir)
    entry = rehearsal_info[NAME] | {"file_name": str(rehearsal_dir / rehearsal_info[NAME]["file_name"])}
    names = entry_names(samples, available)
    for i, name in enumerate(names):  # the first entries draw the whole pool, the last one the rest
        info[name] = entry | {"num_samples": available if i < len(names) - 1 else samples - available * i}
    return Mix(info, train, samples, available, asked, r.max_repeats)


def processed_entries(data_dir: Path) -> dict:
    """The prepare stage's dataset_info.json entries (train, val), their files located from the repo root."""
    processed = read_json(data_dir / "dataset_info.json")
    return {name: entry | {"file_name": str(data_dir / entry["file_name"])} for name, entry in processed.items()}


def run_datasets(mix: Mix | None, data_dir: Path, val_examples: int | None) -> dict | None:
    """The dataset_info.json the train stage writes beside its config, or None when data/processed's own will do:
    the rehearsal mix, and on a CPU a draw of `val_examples` of the val split for the in-training eval
    (lf/budget.py plan_cpu_eval; LLaMA-Factory's num_samples, drawn with the seed)."""
    if mix is None and val_examples is None:
        return None
    info = dict(mix.info) if mix else processed_entries(data_dir)
    if val_examples is not None:
        info["val"] = info["val"] | {"num_samples": val_examples}
    return info


def write_dataset_info(info: dict, where: Path, relative_to: Path | None = None) -> Path:
    """where/dataset_info.json with the entries' files as absolute paths, or relative to `relative_to` (the folder
    the file ends up in: `where` may be a temporary folder of another depth, renamed into place later)."""

    def located(file: str) -> str:
        return os.path.relpath(file, relative_to) if relative_to else os.path.abspath(file)

    entries = {name: entry | {"file_name": located(entry["file_name"])} for name, entry in info.items()}
    write_json(where / "dataset_info.json", entries)
    return where / "dataset_info.json"


def describe(mix: Mix, share: float) -> list[str]:
    """The log lines of a mix: what is drawn, and why the share came down if the pool was too small."""
    times = {1: "once", 2: "twice"}.get(mix.repeats, f"{mix.repeats} times")
    lines = [
        f"rehearsal: {mix.samples} of the base model's own answers ({mix.available} available, none drawn more "
        f"than {times} an epoch) mixed with your {mix.train_examples} training examples: {100 * mix.share:.0f}% "
        f"of each epoch (rehearse.share {share:g})"
    ]
    if mix.samples < mix.asked and mix.samples == mix.available * mix.max_repeats:
        lines.append(
            f"rehearsal share down from {share:.0%} to {mix.share:.0%}: {share:g} of an epoch of your "
            f"{mix.train_examples} examples asks for {mix.asked} rehearsal examples, but {mix.available} answers "
            f"drawn at most rehearse.max_repeats={mix.max_repeats} times give {mix.samples}; add prompts to "
            "rehearse.prompts (each becomes one more answer) to keep the share"
        )
    return lines


def fingerprint_extra(mix: Mix | None) -> str:
    """What the checkpoints' fingerprint must also cover: the rehearsal data and how much of it is drawn."""
    if mix is None:
        return ""
    entries = {name: mix.info[name] for name in entry_names(mix.samples, mix.available)}
    return json.dumps(entries, sort_keys=True) + Path(mix.info[NAME]["file_name"]).read_text(encoding="utf-8")
