"""Preference data: a user's table of pairs (or of KTO's labelled answers) -> what LLaMA-Factory's stage dpo/kto reads.

    pairs = read_pairs("data/raw/pairs.csv", "dpo", columns={"prompt": "问题"})   # UserError on bad input
    splits = split_pairs(pairs.examples, val_size=0.1, seed=42)
    write_pairs(splits, pairs.kind, Path("data/pairs"))    # train.json, val.json, dataset_info.json: one rename

Pairwise (dpo, orpo, simpo): prompt, chosen, rejected, and optionally input and system. Columns are found by
name or alias as in prepare (instruction/question -> prompt, ...), or named in prefer.columns. LLaMA-Factory's own
pairwise layouts read as they are: Alpaca's (instruction, input, chosen, rejected, history) and ShareGPT's
(conversations ending on a user turn, chosen and rejected as one message each).
KTO: prompt, answer and label (true/false, 1/0, yes/no, good/bad); a pairwise table gives KTO two rows a pair, the
chosen answer labelled good and the rejected one bad.

Every example read is kept or counted under one reason in DROP_REASONS; a label that is not one is an error.
Both kinds are written in LLaMA-Factory's Alpaca layout (history holds earlier turns, system the system prompt).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from llmft.common import UserError, atomic_path, write_json
from llmft.data.mapping import ALIASES as SFT_ALIASES
from llmft.data.tables import read_table

PAIRWISE, KTO = "pairwise", "kto"
ALIASES = {
    "prompt": SFT_ALIASES["instruction"],
    "input": SFT_ALIASES["input"],
    "system": SFT_ALIASES["system"],
    "history": ("history",),
    "messages": SFT_ALIASES["messages"],
    "chosen": ("chosen", "chosen_response", "preferred", "accepted", "better", "好回答"),
    "rejected": ("rejected", "rejected_response", "dispreferred", "worse", "差回答"),
    "answer": SFT_ALIASES["output"],
    "label": ("label", "kto_tag", "tag", "desirable", "标签"),
}
FIELDS = tuple(ALIASES)
DROP_REASONS = (
    "empty_prompt",
    "empty_chosen",
    "empty_rejected",
    "empty_answer",
    "same_answers",  # chosen equal to rejected: nothing to prefer
    "bad_conversation",  # a ShareGPT row LLaMA-Factory would skip: not user/assistant turns ending on the user
    "too_long",  # prompt (with input, history and system) plus the longer answer over prefer.max_chars
    "duplicate",
)
LABELS = {
    "true": True, "1": True, "yes": True, "y": True, "good": True,
    "false": False, "0": False, "no": False, "n": False, "bad": False,
}  # fmt: skip
ROLES = {("from", "value"): ("human", "gpt", "system"), ("role", "content"): ("user", "assistant", "system")}


@dataclasses.dataclass
class Pairs:
    """What a table gave: kept examples in LLaMA-Factory's Alpaca layout, and every dropped one counted."""

    kind: str  # PAIRWISE or KTO
    layout: str  # how the table was read: "columns" or "sharegpt"
    examples: list[dict] = dataclasses.field(default_factory=list)
    examples_in: int = 0
    dropped: Counter = dataclasses.field(default_factory=Counter)

    def stats(self) -> dict:
        dropped = {reason: self.dropped.get(reason, 0) for reason in DROP_REASONS}
        stats = {
            "kind": self.kind,
            "layout": self.layout,
            "examples_in": self.examples_in,
            "kept": len(self.examples),
            "dropped": dropped,
            "dropped_total": sum(dropped.values()),
        }
        assert stats["examples_in"] == stats["kept"] + stats["dropped_total"], stats  # nothing lost silently
        return stats

    def describe(self) -> str:
        dropped = ", ".join(f"{k}={v}" for k, v in self.stats()["dropped"].items() if v) or "none"
        return f"{self.examples_in} {self.kind} examples in, {len(self.examples)} kept; dropped {dropped}"


def text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value.strip() if isinstance(value, str) else str(value).strip()


def kind_of(method: str) -> str:
    """PAIRWISE for dpo, orpo and simpo (and for PAIRWISE itself), KTO for kto."""
    return KTO if method in ("kto", KTO) else PAIRWISE


def resolve_columns(names: list[str], explicit: dict[str, str], kind: str, path, where: str) -> dict[str, str]:
    """{field: column} from `explicit` (prefer.columns) first, then ALIASES (case-insensitive); UserError naming the
    columns found and the fix when the fields the method needs are missing."""
    for fld, col in explicit.items():
        if fld not in ALIASES:
            raise UserError(f"{where}.columns.{fld}: not a field; use {', '.join(FIELDS)}")
        if col not in names:
            raise UserError(
                f"{path}: {where}.columns.{fld} names column {col!r}, which is not in the table; "
                f"columns found: {', '.join(names)}"
            )
    lower = {n.strip().lower(): n for n in names}
    found = dict(explicit)
    for fld, aliases in ALIASES.items():  # a column named in prefer.columns is not taken again by an alias
        col = next((lower[a] for a in aliases if a in lower and lower[a] not in found.values()), None)
        if col is not None:
            found.setdefault(fld, col)
    paired = {"chosen", "rejected"} <= found.keys()
    if kind == PAIRWISE and not paired and {"answer", "label"} <= found.keys():
        raise UserError(
            f"{path}: holds labelled answers (columns {found['answer']!r}, {found['label']!r}), the data of KTO, "
            "not pairs: set prefer.method: kto, or give the table chosen and rejected columns"
        )
    need = ["chosen", "rejected"] if kind == PAIRWISE or paired else ["answer", "label"]
    need = (["prompt"] if "messages" not in found else []) + need
    missing = [f for f in need if f not in found]
    if missing:
        tried = "; ".join(f"{f} <- {'/'.join(ALIASES[f])}" for f in missing)
        raise UserError(
            f"{path}: cannot find the {', '.join(missing)} column(s): columns found: {', '.join(names)}; aliases "
            f"tried: {tried}; set {where}.columns (e.g. {{{missing[0]}: my_column}})"
        )
    return found


def parse_label(value, path, row: int, column: str) -> bool:
    """A KTO label as a bool; UserError naming the row and what a label may be."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    key = text(value).lower()
    if key in LABELS:
        return LABELS[key]
    raise UserError(
        f"{path}: row {row}, column {column!r}: {value!r} is not a label; use true/false, 1/0, yes/no or "
        "good/bad (good = an answer to learn from, bad = one to move away from)"
    )


def _history(value) -> list[list[str]] | None:
    """[[user, assistant], ...] from a cell (JSON text in a CSV); None when it is not that."""
    if value is None or value == "":
        return []
    try:
        value = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        return None
    ok = isinstance(value, list) and all(isinstance(t, (list, tuple)) and len(t) == 2 for t in value)
    return [[text(a), text(b)] for a, b in value] if ok else None


def _message(value) -> str | None:
    """The text of one answer: plain text, or one assistant message ({from: gpt, value} or {role: assistant,
    content}, as LLaMA-Factory's ShareGPT pairs hold it); None when it is a message of another role."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, dict):
        return text(value)
    style = next((s for s in ROLES if set(s) <= value.keys()), None)
    if style is None or value[style[0]] != ROLES[style][1]:
        return None
    return text(value[style[1]])


def _conversation(value) -> dict | None:
    """A ShareGPT prompt -> {instruction, history, system}, or None when LLaMA-Factory would skip it: turns must
    be user/assistant pairs after an optional system turn, ending on a user turn."""
    try:
        conv = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        return None
    if not (isinstance(conv, list) and conv and all(isinstance(m, dict) for m in conv)):
        return None
    style = next((s for s in ROLES if set(s) <= conv[0].keys()), None)
    if style is None or any(not set(style) <= m.keys() for m in conv):
        return None
    role, content = style
    user, assistant, system_tag = ROLES[style]
    system = text(conv[0][content]) if conv[0][role] == system_tag else ""
    body = conv[1:] if conv[0][role] == system_tag else conv
    if not body or len(body) % 2 == 0 or any(m[role] != (user, assistant)[n % 2] for n, m in enumerate(body)):
        return None
    turns = [text(m[content]) for m in body]
    history = [[turns[i], turns[i + 1]] for i in range(0, len(turns) - 1, 2)]
    return {"instruction": turns[-1], "history": history, "system": system}


def _prompt_chars(ex: dict) -> int:
    return (
        len(ex["instruction"])
        + len(ex.get("input", ""))
        + len(ex.get("system", ""))
        + sum(len(a) + len(b) for a, b in ex.get("history", []))
    )


def _keep(pairs: Pairs, seen: set, ex: dict, max_chars: int | None, reason: str | None = None) -> None:
    """Keep `ex`, or count it under the first reason to drop it."""
    answers = [ex[k] for k in ("chosen", "rejected", "output") if k in ex]
    ident = json.dumps(ex, ensure_ascii=False, sort_keys=True)
    reason = reason or (
        "too_long"
        if max_chars and _prompt_chars(ex) + max(map(len, answers)) > max_chars
        else "duplicate"
        if ident in seen
        else None
    )
    if reason:
        pairs.dropped[reason] += 1
        return
    seen.add(ident)
    pairs.examples.append(ex)


def as_kto(pair: dict) -> list[dict]:
    """One pairwise example -> KTO's two: the chosen answer labelled good, the rejected one bad."""
    prompt = {k: v for k, v in pair.items() if k not in ("chosen", "rejected")}
    return [prompt | {"output": pair[side], "kto_tag": side == "chosen"} for side in ("chosen", "rejected")]


def pair_problem(ex: dict) -> str | None:
    """Why a pairwise example can't teach a preference (a DROP_REASONS entry), or None."""
    if not ex["instruction"]:
        return "empty_prompt"
    if not ex["chosen"]:
        return "empty_chosen"
    if not ex["rejected"]:
        return "empty_rejected"
    return "same_answers" if ex["chosen"] == ex["rejected"] else None


def _examples(
    cells: dict, kind: str, sharegpt: bool, path, row: int, label_column: str
) -> tuple[list[dict], str | None]:
    """One row's examples ({field: cell} in `cells`): one, or KTO's two from a pair; and why they are dropped."""
    problem = None
    if sharegpt:
        ex = _conversation(cells["messages"])
        if ex is None:
            problem, ex = "bad_conversation", {"instruction": "", "history": [], "system": ""}
        elif text(cells.get("system")):
            ex["system"] = text(cells["system"])
    else:
        ex = {"instruction": text(cells.get("prompt")), "input": text(cells.get("input"))}
        if "system" in cells:
            ex["system"] = text(cells["system"])
        if "history" in cells:
            ex["history"] = _history(cells["history"])
            problem = "bad_conversation" if ex["history"] is None else None
    if "chosen" in cells and "rejected" in cells:
        chosen, rejected = _message(cells["chosen"]), _message(cells["rejected"])
        ex |= {"chosen": chosen or "", "rejected": rejected or ""}
        problem = problem or ("bad_conversation" if chosen is None or rejected is None else pair_problem(ex))
        return ([ex] if kind == PAIRWISE else as_kto(ex)), problem
    ex |= {"output": text(cells.get("answer")), "kto_tag": parse_label(cells.get("label"), path, row, label_column)}
    empty = "empty_prompt" if not ex["instruction"] else "empty_answer" if not ex["output"] else None
    return [ex], problem or empty


def build_pairs(
    columns: dict[str, list],
    kind: str,
    explicit: dict[str, str] | None = None,
    max_chars: int | None = None,
    path: str | Path = "the table",
    where: str = "prefer",
) -> Pairs:
    """Table columns -> Pairs of `kind` (PAIRWISE or KTO, or a method), every example not kept counted by reason.

    Raises:
        UserError: a column the method needs is missing, or a KTO label is not one; it names the row or column.
    """
    kind = kind_of(kind)
    found = resolve_columns(list(columns), explicit or {}, kind, path, where)
    sharegpt = "messages" in found and ("messages" in (explicit or {}) or "prompt" not in found)
    pairs = Pairs(kind, "sharegpt" if sharegpt else "columns")
    seen: set = set()
    where_is = {fld: list(columns).index(col) for fld, col in found.items()}
    for row, values in enumerate(zip(*columns.values()), start=1):
        cells = {fld: values[i] for fld, i in where_is.items()}
        examples, problem = _examples(cells, kind, sharegpt, path, row, found.get("label", ""))
        for ex in examples:
            pairs.examples_in += 1
            _keep(pairs, seen, ex, max_chars, problem)
    return pairs


def read_pairs(
    path: str | Path,
    method: str,
    columns: dict[str, str] | None = None,
    max_chars: int | None = None,
    where: str = "prefer",
) -> Pairs:
    """Read a user's pairs table (any format llmft.data.tables reads) for `method` (dpo, orpo, simpo or kto).

    Raises:
        UserError: unreadable table, missing column, bad label, or nothing left to train on; one line, with the fix.
    """
    table = read_table(path)
    pairs = build_pairs(table.columns, kind_of(method), columns, max_chars, path, where)
    if not pairs.examples:
        raise UserError(
            f"{path}: all {pairs.examples_in} examples were dropped ({pairs.describe()}); check {where}.columns "
            f"and {where}.max_chars"
        )
    return pairs


def split_key(ex: dict) -> str:
    """What keeps examples in one split: the prompt with its context, so a prompt is never in train and val."""
    history = json.dumps(ex.get("history", []), ensure_ascii=False)
    return "\x1f".join((ex.get("system", ""), history, ex["instruction"], ex.get("input", "")))


def split_pairs(examples: list[dict], val_size: int | float, seed: int, where: str = "prefer") -> dict[str, list[dict]]:
    """{"train": [...], "val": [...]}: prepare's seeded split, a prompt's examples (both KTO rows of a pair) held
    together, so the result depends only on the data and the seed.

    Raises:
        UserError: val_size leaves no training examples.
    """
    from llmft.data.prepare import split_indices

    rule = SimpleNamespace(val_size=val_size, test_size=0, seed=seed)
    keys = [split_key(ex) for ex in examples]
    try:
        chosen = split_indices(keys, rule)
    except UserError:  # its message names prepare's keys
        raise UserError(
            f"{where}.val_size={val_size} leaves no training examples out of {len(examples)} "
            f"({len(set(keys))} distinct prompts); lower it, or add pairs"
        ) from None
    return {name: [examples[i] for i in chosen[name]] for name in ("train", "val")}


def dataset_info(kind: str, names: list[str], fields: set[str]) -> dict:
    """dataset_info.json entries: `ranking: true` for pairs, a `kto_tag` column for KTO."""
    columns = {"prompt": "instruction", "query": "input"}
    columns |= {"chosen": "chosen", "rejected": "rejected"} if kind == PAIRWISE else {"response": "output"}
    columns |= {"kto_tag": "kto_tag"} if kind == KTO else {}
    columns |= {f: f for f in ("system", "history") if f in fields}
    extra = {"ranking": True} if kind == PAIRWISE else {}
    return {n: {"file_name": f"{n}.json"} | extra | {"columns": columns} for n in names}


def write_pairs(splits: dict[str, list[dict]], kind: str, out_dir: Path) -> dict:
    """out_dir <- one JSON file per split and dataset_info.json, in one rename; returns the dataset_info written."""
    fields = {k for rows in splits.values() for ex in rows for k in ex}
    # every row the same keys: the datasets library reads a file's columns from its rows, LLaMA-Factory then by name
    common = sorted(fields & {"system", "history"} | {"input"})
    splits = {
        name: [ex | {f: ex.get(f, [] if f == "history" else "") for f in common} for ex in rows]
        for name, rows in splits.items()
    }
    info = dataset_info(kind, list(splits), fields)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, rows in splits.items():
            write_json(tmp / f"{name}.json", rows)
        write_json(tmp / "dataset_info.json", info)
    return info
