"""Two LoRA adapters added into one, exactly: the prefer stage's SFT adapter plus its preference update.

    combine_adapters(Path("models/lora"), Path("checkpoints-prefer"), Path("models/prefer"))
    python -m llmft.adapters combine models/lora checkpoints-prefer models/prefer    # the same, by hand

The later stages (evaluate, export, benchmark, gguf, chat) load one adapter on models/base; a sum of two LoRA
updates is itself a LoRA update of the summed rank, so nothing downstream needs to know there were two.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from llmft.common import UserError, atomic_path, get_logger, read_json, write_json

log = get_logger("adapters")


def dora_message(where: Path) -> str:
    return (
        f"{where}: a DoRA adapter (use_dora: true) can't be combined with another exactly: DoRA rescales each "
        "weight by its norm, which does not add up; set train.use_dora: false and rerun train"
    )


LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?P<suffix>\.weight)?$"
)
SAME_KEYS = ("peft_type", "base_model_name_or_path", "fan_in_fan_out", "layers_to_transform", "layers_pattern")


def _lora_parts(weights: dict, where: Path) -> dict[str, dict[str, Any]]:
    """{module: {"A": tensor, "B": tensor, "embedding": bool, "suffix": str}}; UserError for anything else."""
    modules: dict[str, dict[str, Any]] = {}
    for key, tensor in weights.items():
        match = LORA_KEY.match(key)
        if match is None or tensor.dim() != 2:
            raise UserError(
                f"{where}: {key} is not a LoRA matrix (modules_to_save, DoRA magnitudes or conv layers can't be "
                "combined by concatenating ranks); train the adapters as plain LoRA on linear layers"
            )
        part = match["part"]
        entry = modules.setdefault(match["module"], {"embedding": "embedding" in part, "suffix": match["suffix"] or ""})
        entry[part[-1]] = tensor
    return modules


def _scaling(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def combine_adapters(first: Path, second: Path, out: Path) -> dict:
    """One PEFT LoRA adapter whose update is `first`'s plus `second`'s, exactly, written to `out` in one rename.

    For every module, update = s1 B1 A1 + s2 B2 A2 = [s1 B1 | s2 B2] [A1 ; A2]: the A matrices are stacked, the B
    matrices set side by side with each adapter's scaling (alpha/r, or alpha/sqrt(r) with rsLoRA) folded in, and
    r = lora_alpha = r1 + r2 so PEFT's scaling is 1. A module only one adapter has gets zero rows there. Computed in
    float64, stored in the adapters' dtype. Returns the adapter config written.

    Raises:
        UserError: DoRA, rank or alpha patterns, modules_to_save, or adapters of different bases or layouts.
    """
    import torch
    from safetensors.torch import load_file, save_file

    configs = [read_json(d / "adapter_config.json") for d in (first, second)]
    for d, c in zip((first, second), configs, strict=True):
        if c.get("peft_type") != "LORA":
            raise UserError(f"{d}: a {c.get('peft_type')} adapter, not LoRA: only LoRA adapters combine by rank")
        if c.get("use_dora"):
            raise UserError(dora_message(d))
        for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
            if c.get(key):
                raise UserError(f"{d}: adapter_config.json sets {key}; only plain LoRA adapters combine exactly")
    for key in SAME_KEYS:
        if key != "base_model_name_or_path" and configs[0].get(key) != configs[1].get(key):
            raise UserError(f"{first} and {second} differ in {key}: they are not LoRA adapters of one layout")
    parts = [_lora_parts(load_file(d / "adapter_model.safetensors"), d) for d in (first, second)]
    scales = [_scaling(c) for c in configs]
    ranks = [c["r"] for c in configs]
    dtype = torch.promote_types(*(next(iter(p.values()))["A"].dtype for p in parts))
    combined: dict[str, torch.Tensor] = {}
    for module in sorted(parts[0].keys() | parts[1].keys()):
        there = next(p[module] for p in parts if module in p)
        rows, cols = there["A"].shape[1], there["B"].shape[0]
        a, b = [], []
        for part, scale, r in zip(parts, scales, ranks, strict=True):
            entry = part.get(module)
            a.append(entry["A"].double() if entry else torch.zeros(r, rows, dtype=torch.float64))
            b.append(entry["B"].double() * scale if entry else torch.zeros(cols, r, dtype=torch.float64))
        names = ("lora_embedding_A", "lora_embedding_B") if there["embedding"] else ("lora_A", "lora_B")
        combined[f"{module}.{names[0]}{there['suffix']}"] = torch.cat(a, dim=0).to(dtype).contiguous()
        combined[f"{module}.{names[1]}{there['suffix']}"] = torch.cat(b, dim=1).to(dtype).contiguous()
    config = dict(configs[0])
    targets = [c.get("target_modules") for c in configs]
    if all(isinstance(x, list) for x in targets):
        config["target_modules"] = sorted(set(targets[0]) | set(targets[1]))
    elif targets[0] != targets[1]:
        raise UserError(f"{first} and {second} name their target modules differently ({targets}); use lists")
    config |= {"r": sum(ranks), "lora_alpha": sum(ranks), "use_rslora": False, "inference_mode": True}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_file(combined, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        write_json(tmp / "adapter_config.json", config)
    return config


def main(argv: list[str] | None = None) -> int:
    """python -m llmft.adapters combine FIRST SECOND OUT: the prefer stage's last step, by hand."""
    import argparse

    parser = argparse.ArgumentParser(description="Add two LoRA adapters into one, exactly (ranks concatenated).")
    sub = parser.add_subparsers(dest="command", required=True)
    combine = sub.add_parser("combine", help="OUT = FIRST + SECOND, e.g. models/lora <output_dir> models/prefer")
    for name in ("first", "second", "out"):
        combine.add_argument(name, type=Path)
    args = parser.parse_args(argv)
    config = combine_adapters(args.first, args.second, args.out)
    log.info("wrote %s: rank %d = %s + %s", args.out, config["r"], args.first, args.second)
    return 0


if __name__ == "__main__":
    from llmft.common import run_main

    raise SystemExit(run_main(main))
