"""The prepare stage's work: read the table, build examples, split them, write what LLaMA-Factory reads.

splits, info, stats = prepare(params.data)
write_outputs(splits, info, stats, Path("data/processed"), Path("reports/metrics/prepare.json"))
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from llmft.common import UserError, atomic_path, atomic_write_json, get_logger, write_json
from llmft.data.mapping import DROP_REASONS, build_examples
from llmft.data.tables import read_table
from llmft.params import DataParams

log = get_logger("prepare")


def _split_count(size: int | float, total: int) -> int:
    return size if isinstance(size, int) else max(1, round(size * total))


def split_examples(examples: list[dict], keys: list[str], p: DataParams) -> dict[str, list[dict]]:
    """Deterministic split by seed, keeping every example with the same prompt in one split.

    Groups are ordered by a seeded SHA-256 of their prompt, so the result depends only on
    the data and the seed (not on row order, machine or Python's hash seed), and adding rows
    later moves only the prompts at the val/test/train boundaries. A group is never cut, so
    val and test may hold a few more examples than asked when prompts repeat.
    """
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    order = sorted(groups, key=lambda k: hashlib.sha256(f"{p.seed}\x1f{k}".encode()).digest())
    total = len(examples)
    want = {"val": _split_count(p.val_size, total), "test": _split_count(p.test_size, total) if p.test_size else 0}
    if want["val"] + want["test"] >= total:
        raise UserError(
            f"data.val_size={p.val_size} and data.test_size={p.test_size} leave no training examples "
            f"out of {total} kept; lower them"
        )
    chosen: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for key in order:
        name = next((n for n in ("val", "test") if len(chosen[n]) < want[n]), "train")
        chosen[name].extend(groups[key])
    if not chosen["train"]:  # repeated prompts filled val/test before train got any
        raise UserError(
            f"data.val_size={p.val_size} and data.test_size={p.test_size} leave no training examples: "
            f"the {total} kept examples have only {len(groups)} distinct prompts; lower them or add data"
        )
    splits = {name: [examples[i] for i in sorted(idx)] for name, idx in chosen.items()}
    return {name: rows for name, rows in splits.items() if rows or name != "test"}


def _percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": values[-1]}


def dataset_info(kind: str, names: list[str], present: set[str], tags: dict[str, str]) -> dict:
    """The dataset_info.json entries LLaMA-Factory reads to find and parse each split."""
    if kind == "sharegpt":
        columns = {"messages": "conversations"} | ({"system": "system"} if "system" in present else {})
        return {
            n: {"file_name": f"{n}.json", "formatting": "sharegpt", "columns": columns, "tags": tags} for n in names
        }
    columns = {"prompt": "instruction", "query": "input", "response": "output"}
    columns |= {f: f for f in ("system", "history") if f in present}
    return {n: {"file_name": f"{n}.json", "columns": columns} for n in names}


def prepare(p: DataParams, do_split: bool = True) -> tuple[dict[str, list[dict]], dict, dict]:
    """Read, map, clean and split (unless `do_split` is false); return (splits, dataset_info, stats)."""
    table = read_table(p.input, p.format, p.encoding, p.sheet)
    built = build_examples(table.columns, p)
    if not built.examples:
        dropped = {reason: built.dropped[reason] for reason in DROP_REASONS}
        raise UserError(
            f"{p.input}: all {built.examples_in} examples were dropped ({_fmt(dropped)}); "
            "check data.columns/data.templates and the length limits"
        )
    splits = split_examples(built.examples, built.keys, p) if do_split else {"all": built.examples}
    info = dataset_info(built.kind, list(splits), built.fields, built.tags)
    dropped = {reason: built.dropped.get(reason, 0) for reason in DROP_REASONS}
    stats = {
        "rows_in": table.num_rows,
        "examples_in": built.examples_in,
        "kept": len(built.examples),
        "dropped": dropped,
        "dropped_total": sum(dropped.values()),
        "splits": {name: len(rows) for name, rows in splits.items()},
        "prompt_chars": _percentiles(built.prompt_chars),
        "output_chars": _percentiles(built.output_chars),
    }
    assert stats["examples_in"] == stats["kept"] + stats["dropped_total"], stats  # nothing lost silently
    log.info(
        "read %s (%s, %s): %d rows -> %d examples (%s); kept %d; dropped %s; splits %s",
        p.input,
        table.format,
        table.encoding or "binary",
        table.num_rows,
        built.examples_in,
        built.kind,
        stats["kept"],
        _fmt(built.dropped) or "none",
        _fmt(stats["splits"]),
    )
    return splits, info, stats


def _fmt(counts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items() if v)


def write_pipeline_outputs(splits: dict, info: dict, stats: dict, out_dir: Path, stats_path: Path) -> None:
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, rows in splits.items():
            write_json(tmp / f"{name}.json", rows)
        write_json(tmp / "dataset_info.json", info)
    atomic_write_json(stats_path, stats)


def write_legacy_outputs(splits: dict, output: Path, split: bool) -> None:
    if not split:
        atomic_write_json(output, [row for rows in splits.values() for row in rows])
        return
    for name, rows in splits.items():
        atomic_write_json(output.with_name(f"{output.stem}_{name}{output.suffix}"), rows)
