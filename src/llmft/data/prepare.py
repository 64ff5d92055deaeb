"""The prepare stage's work: read the tables, build examples, mix and split them, write what LLaMA-Factory reads.

splits, info, stats = prepare(params.prepare)
write_pipeline_outputs(splits, info, stats, Path("data/processed"), Path("reports/metrics/prepare.json"))
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

from llmft.common import UserError, atomic_path, atomic_write_json, get_logger, write_json
from llmft.data.mapping import DROP_REASONS, Built, build_examples
from llmft.data.tables import read_table
from llmft.params import PrepareParams, SourceParams
from llmft.variables import PLACEHOLDER

log = get_logger("prepare")


def _split_count(size: int | float, total: int) -> int:
    return size if isinstance(size, int) else max(1, round(size * total))


def split_indices(keys: list[str], p: PrepareParams) -> dict[str, list[int]]:
    """Deterministic split by seed, keeping every example with the same prompt in one split: {split: indices}.

    Groups are ordered by a seeded SHA-256 of their prompt, so the result depends only on
    the data and the seed (not on row order, machine or Python's hash seed), and adding rows
    later moves only the prompts at the val/test/train boundaries. A group is never cut, so
    val and test may hold a few more examples than asked when prompts repeat. Each split keeps the input order.
    """
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    order = sorted(groups, key=lambda k: hashlib.sha256(f"{p.seed}\x1f{k}".encode()).digest())
    total = len(keys)
    want = {"val": _split_count(p.val_size, total), "test": _split_count(p.test_size, total) if p.test_size else 0}
    if want["val"] + want["test"] >= total:
        raise UserError(
            f"prepare.val_size={p.val_size} and prepare.test_size={p.test_size} leave no training examples "
            f"out of {total} kept; lower them"
        )
    chosen: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for key in order:
        name = next((n for n in ("val", "test") if len(chosen[n]) < want[n]), "train")
        chosen[name].extend(groups[key])
    if not chosen["train"]:  # repeated prompts filled val/test before train got any
        raise UserError(
            f"prepare.val_size={p.val_size} and prepare.test_size={p.test_size} leave no training examples: "
            f"the {total} kept examples have only {len(groups)} distinct prompts; lower them or add data"
        )
    return {name: sorted(idx) for name, idx in chosen.items() if idx or name != "test"}


def _percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]
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


def fill_variables(columns: dict[str, list], variables: dict[str, str], path: str, where: str) -> dict[str, list]:
    """Replace {{key}} in every text cell (and inside ShareGPT messages) with its value from `variables`.

    Raises:
        UserError: a placeholder has no value; it names the keys and where to set them.
    """
    missing: set[str] = set()

    def value(match: re.Match) -> str:
        if match[1] in variables:
            return variables[match[1]]
        missing.add(match[1])
        return match[0]

    def fill(cell):
        if isinstance(cell, str):
            return PLACEHOLDER.sub(value, cell) if "{{" in cell else cell
        if isinstance(cell, list):
            return [fill(c) for c in cell]
        return {k: fill(c) for k, c in cell.items()} if isinstance(cell, dict) else cell

    filled = {name: [fill(c) for c in cells] for name, cells in columns.items()}
    if missing:
        keys = sorted(missing)
        example = ", ".join(f"{k}: ..." for k in keys)
        raise UserError(
            f"{path}: {', '.join('{{' + k + '}}' for k in keys)} {'has' if len(keys) == 1 else 'have'} no value; "
            f"set prepare.variables: {{{example}}} (or {where}.variables for this table only)"
        )
    return filled


@dataclasses.dataclass
class SourceExamples:
    """What one input table gave: its examples (kept) and its counts."""

    label: str
    built: Built
    stats: dict


def read_source(src: SourceParams, p: PrepareParams, seen: set, where: str) -> SourceExamples:
    """One table -> examples: read, fill variables, cap rows, map and clean (dedup against `seen`)."""
    table = read_table(src.path, src.format, src.encoding, src.sheet)
    columns = fill_variables(table.columns, p.variables | src.variables, src.path, where)
    capped = max(0, table.num_rows - src.max_rows) if src.max_rows else 0
    if capped:
        columns = {name: cells[: src.max_rows] for name, cells in columns.items()}
    built = build_examples(columns, src, p, seen, where)
    per_row = len(src.templates) or 1
    built.examples_in += capped * per_row
    built.dropped["over_max_rows"] += capped * per_row
    if not built.examples and built.dropped["duplicate"] == built.examples_in:
        log.warning("%s: every example repeats one of an earlier source; it adds nothing", src.path)
    elif not built.examples:
        dropped = {reason: built.dropped[reason] for reason in DROP_REASONS}
        raise UserError(
            f"{src.path}: all {built.examples_in} examples were dropped ({_fmt(dropped)}); "
            f"check {where}.columns/{where}.templates and the length limits"
        )
    dropped = {reason: built.dropped.get(reason, 0) for reason in DROP_REASONS}
    stats = {
        "path": src.path,
        "format": table.format,
        "encoding": table.encoding,
        "rows_in": table.num_rows,
        "examples_in": built.examples_in,
        "kept": len(built.examples),
        "dropped": dropped,
        "dropped_total": sum(dropped.values()),
    }
    assert stats["examples_in"] == stats["kept"] + stats["dropped_total"], stats  # nothing lost silently
    return SourceExamples(src.label, built, stats)


def mix(sources: list[SourceExamples], seed: int) -> tuple[list[dict], list[str], list[str]]:
    """All sources' examples in one deterministic order: (examples, split keys, source label of each).

    One source keeps its own order. Several are interleaved by a seeded hash of (source, position), so every part
    of the training file (LLaMA-Factory's max_samples takes its first N) holds each source in proportion, and the
    order depends only on the data and the seed.
    """
    items = [(s.label, i, ex, key) for s in sources for i, (ex, key) in enumerate(zip(s.built.examples, s.built.keys))]
    if len(sources) > 1:
        items.sort(key=lambda it: hashlib.sha256(f"{seed}\x1f{it[0]}\x1f{it[1]}".encode()).digest())
    return [it[2] for it in items], [it[3] for it in items], [it[0] for it in items]


def _same_kind(sources: list[SourceExamples]) -> tuple[str, set[str], dict[str, str]]:
    """The examples' format, fields and ShareGPT tags, which every source must share (one file per split)."""
    kinds = {s.label: s.built.kind for s in sources}
    if len(set(kinds.values())) > 1:
        raise UserError(f"prepare.sources mix Alpaca and ShareGPT tables ({kinds}); a split holds one kind: use one")
    tags = [s.built.tags for s in sources if s.built.tags]
    if any(t != tags[0] for t in tags):
        raise UserError("prepare.sources: the ShareGPT tables name roles differently (from/value vs role/content)")
    return sources[0].built.kind, set().union(*(s.built.fields for s in sources)), tags[0] if tags else {}


def prepare(p: PrepareParams, do_split: bool = True) -> tuple[dict[str, list[dict]], dict, dict]:
    """Read, map, clean, mix and split (unless `do_split` is false); return (splits, dataset_info, stats)."""
    seen: set = set()  # dedup across sources too
    tables = p.tables()
    sources = [
        read_source(src, p, seen, "prepare" if p.input else f"prepare.sources[{i}]") for i, src in enumerate(tables, 1)
    ]
    kind, fields, tags = _same_kind(sources)
    examples, keys, labels = mix(sources, p.seed)
    if kind == "alpaca":  # one set of columns for every example, whichever table it came from
        for ex in examples:
            ex.update({f: ex.get(f, [] if f == "history" else "") for f in sorted(fields)})
    chosen = split_indices(keys, p) if do_split else {"all": list(range(len(examples)))}
    splits = {name: [examples[i] for i in idx] for name, idx in chosen.items()}
    info = dataset_info(kind, list(splits), fields, tags)
    dropped = {reason: sum(s.stats["dropped"][reason] for s in sources) for reason in DROP_REASONS}
    for s in sources:
        s.stats["splits"] = {name: sum(labels[i] == s.label for i in idx) for name, idx in chosen.items()}
    stats = {
        "rows_in": sum(s.stats["rows_in"] for s in sources),
        "examples_in": sum(s.stats["examples_in"] for s in sources),
        "kept": len(examples),
        "dropped": dropped,
        "dropped_total": sum(dropped.values()),
        "splits": {name: len(rows) for name, rows in splits.items()},
        "prompt_chars": _percentiles([n for s in sources for n in s.built.prompt_chars]),
        "output_chars": _percentiles([n for s in sources for n in s.built.output_chars]),
        "sources": {s.label: s.stats for s in sources},
    }
    assert stats["examples_in"] == stats["kept"] + stats["dropped_total"], stats  # nothing lost silently
    for s in sources:  # logged once everything succeeded: a failing run prints its one error line only
        st = s.stats
        log.info(
            "read %s (%s, %s): %d rows -> %d examples (%s); kept %d; dropped %s",
            st["path"],
            st["format"],
            st["encoding"] or "binary",
            st["rows_in"],
            st["examples_in"],
            kind,
            st["kept"],
            _fmt(st["dropped"]) or "none",
        )
    log.info("kept %d examples from %d table(s); splits %s", len(examples), len(sources), _fmt(stats["splits"]))
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


def outside_deps(paths: list[str], dvc_yaml: Path = Path("dvc.yaml"), stage: str = "prepare") -> list[str]:
    """The tables DVC would not notice changing: not under any dependency dvc.yaml lists for the stage.

    Table paths are relative to the working directory (the repo root, where DVC runs the stage), deps to dvc.yaml.
    """
    import yaml

    if not dvc_yaml.is_file():
        return []
    deps = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")).get("stages", {}).get(stage) or {}).get("deps", [])
    roots = [(dvc_yaml.parent / d).resolve() for d in deps if isinstance(d, str) and "${" not in d]
    return [p for p in paths if not any(Path(p).resolve().is_relative_to(root) for root in roots)]
