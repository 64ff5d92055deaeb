"""Map table columns to Alpaca fields (directly, by alias, or by templates) or pass ShareGPT through; clean.

Every example that is not kept is counted under one reason in DROP_REASONS.
"""

from __future__ import annotations

import json
import math
import string
from collections import Counter
from dataclasses import dataclass, field

from llmft.common import UserError
from llmft.params import PrepareParams, TableParams

ALIASES = {
    "instruction": ("instruction", "prompt", "question", "query", "指令", "问题"),
    "input": ("input", "context", "输入", "上下文"),
    "output": ("output", "response", "answer", "completion", "target", "回答", "答案", "输出"),
    "system": ("system", "system_prompt"),
    "history": ("history",),
    "messages": ("conversations", "messages"),
}
DROP_REASONS = (
    "empty_instruction",
    "empty_output",
    "bad_history",
    "bad_conversation",
    "prompt_too_long",
    "output_too_long",
    "duplicate",
    "over_max_rows",  # rows past a source's max_rows (counted once per example they would have made)
)
_TOOL_TAGS = {"observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
SHAREGPT_TAGS = {
    ("from", "value"): {
        "role_tag": "from",
        "content_tag": "value",
        "user_tag": "human",
        "assistant_tag": "gpt",
        **_TOOL_TAGS,
    },
    ("role", "content"): {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        **_TOOL_TAGS,
    },
}


@dataclass
class Built:
    kind: str  # "alpaca" or "sharegpt"
    examples_in: int = 0
    examples: list[dict] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # the prompt of each example: the split's no-leak unit
    fields: set[str] = field(default_factory=set)
    tags: dict[str, str] = field(default_factory=dict)
    dropped: Counter = field(default_factory=Counter)
    prompt_chars: list[int] = field(default_factory=list)
    output_chars: list[int] = field(default_factory=list)


def text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value.strip() if isinstance(value, str) else str(value).strip()


def resolve_columns(names: list[str], explicit: dict[str, str], where: str = "prepare") -> dict[str, str]:
    """Return {field: column}, from prepare.columns first, then from ALIASES (case-insensitive).

    A table with a messages column and no instruction+output (or prepare.columns.messages) is ShareGPT.
    """
    for fld, col in explicit.items():
        if col not in names:
            raise UserError(
                f"{where}.columns.{fld} names column {col!r}, which is not in the table; "
                f"columns found: {', '.join(names)}"
            )
    lower = {n.strip().lower(): n for n in names}
    found = dict(explicit)
    for fld, aliases in ALIASES.items():  # a column named in prepare.columns is not taken again by an alias
        col = next((lower[a] for a in aliases if a in lower and lower[a] not in explicit.values()), None)
        if col is not None:
            found.setdefault(fld, col)
    if "messages" in found and ("messages" in explicit or not {"instruction", "output"} <= found.keys()):
        return {f: c for f, c in found.items() if f in ("messages", "system")}
    missing = [f for f in ("instruction", "output") if f not in found]
    if missing:
        tried = "; ".join(f"{f} <- {'/'.join(ALIASES[f])}" for f in missing)
        raise UserError(
            f"cannot map columns to {' and '.join(missing)}: columns found: {', '.join(names)}; aliases "
            f"tried: {tried}; set {where}.columns (e.g. {{instruction: my_col}}) or {where}.templates"
        )
    return found


def _check_templates(
    table: TableParams, names: list[str], where: str = "prepare"
) -> list[dict[str, tuple[str, list[str]]]]:
    """Return, per template, {field: (format string, columns it uses)}; refuse unknown columns."""
    templates: list[dict] = []
    for n, tpl in enumerate(table.templates, start=1):
        templates.append({})
        for fld, fmt in ((k, v) for k, v in tpl.model_dump().items() if v):
            try:
                used = [name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None]
            except ValueError as exc:
                raise UserError(f"{where}.templates[{n}].{fld}: bad template {fmt!r}: {exc}") from None
            unknown = [name for name in used if name not in names]
            if unknown:
                raise UserError(
                    f"{where}.templates[{n}].{fld} uses column {{{unknown[0]}}}, which is not in the table; "
                    f"columns found: {', '.join(names)}"
                )
            templates[-1][fld] = (fmt, used)
    return templates


def _history(value):
    """History as [[user, assistant], ...]; JSON text from CSV cells is parsed. None when malformed."""
    if value is None or value == "":
        return []
    try:
        value = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        return None
    ok = isinstance(value, list) and all(isinstance(t, (list, tuple)) and len(t) == 2 for t in value)
    return [[text(a), text(b)] for a, b in value] if ok else None


def _keep(built: Built, p: PrepareParams, seen: set, ex: dict, key: str, prompt_len: int, output_len: int, reason=None):
    """Keep the example, or count it under the first reason to drop it."""
    # Keys come in a fixed order per dataset; plain strings hash as they are (json.dumps each is 3x slower).
    ident = tuple(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in ex.values())
    reason = reason or (
        "prompt_too_long"
        if p.max_prompt_chars and prompt_len > p.max_prompt_chars
        else "output_too_long"
        if p.max_output_chars and output_len > p.max_output_chars
        else "duplicate"
        if p.dedup and ident in seen
        else None
    )
    if reason:
        built.dropped[reason] += 1
        return
    if p.dedup:
        seen.add(ident)
    built.examples.append(ex)
    built.keys.append(key)
    built.prompt_chars.append(prompt_len)
    built.output_chars.append(output_len)


def _alpaca(
    columns: dict[str, list],
    p: PrepareParams,
    built: Built,
    mapping: dict[str, str] | None,
    seen: set,
    templates: list | None,
) -> None:
    names = list(columns)
    built.fields = {f for f in ("system", "history") if any(f in t for t in templates or [mapping])}
    for values in zip(*columns.values()):
        row = dict(zip(names, values))
        if templates:
            cells = {k: text(v) for k, v in row.items()}
            # "解释成语「」的意思。" (empty {word}) is no instruction: a field whose columns are all empty is empty
            candidates = [
                {
                    f: fmt.format_map(cells).strip() if not used or any(cells[c] for c in used) else ""
                    for f, (fmt, used) in t.items()
                }
                for t in templates
            ]
        else:
            candidates = [{f: row[c] for f, c in mapping.items() if f != "messages"}]
        for cand in candidates:
            built.examples_in += 1
            ex = {
                "instruction": text(cand.get("instruction")),
                "input": text(cand.get("input")),
                "output": text(cand.get("output")),
            }
            if "system" in built.fields:
                ex["system"] = text(cand.get("system"))
            if "history" in built.fields:
                ex["history"] = _history(cand.get("history"))
            reason = (
                "empty_instruction"
                if not ex["instruction"]
                else "empty_output"
                if not ex["output"]
                else "bad_history"
                if ex.get("history", []) is None
                else None
            )
            key = ex["instruction"] + "\x1f" + ex["input"]
            _keep(built, p, seen, ex, key, len(ex["instruction"]) + len(ex["input"]), len(ex["output"]), reason)


def _conversation(conv, tags: dict[str, str]) -> tuple | str:
    """(turns, split key, prompt chars, answer chars, tags), or a drop reason; checked as LLaMA-Factory will."""
    try:
        conv = json.loads(conv) if isinstance(conv, str) else conv
    except json.JSONDecodeError:
        return "bad_conversation"
    ok = isinstance(conv, list) and conv and all(isinstance(m, dict) for m in conv)
    style = next((s for s in SHAREGPT_TAGS if set(s) <= conv[0].keys()), None) if ok else None
    if (
        style is None
        or any(not set(style) <= m.keys() for m in conv)
        or (tags and style != (tags["role_tag"], tags["content_tag"]))
    ):
        return "bad_conversation"
    tags = tags or SHAREGPT_TAGS[style]  # the first good conversation fixes the tags of the dataset
    role, content = style
    turns = [{role: text(m[role]), content: text(m[content])} for m in conv]
    body = turns[1:] if turns[0][role] == tags["system_tag"] else turns
    allowed = ((tags["user_tag"], tags["observation_tag"]), (tags["assistant_tag"], tags["function_tag"]))
    if not body or len(body) % 2 or any(t[role] not in allowed[n % 2] for n, t in enumerate(body)):
        return "bad_conversation"  # LLaMA-Factory wants (user, assistant) pairs after an optional system turn
    empty = next((n for n, t in enumerate(body) if not t[content]), None)
    if empty is not None:
        return "empty_output" if empty % 2 else "empty_instruction"
    answered = sum(len(t[content]) for t in body[1::2])
    # the split key is the first user turn, not a system turn that every conversation may share
    return turns, body[0][content], sum(len(t[content]) for t in turns) - answered, answered, tags


def _sharegpt(columns: dict[str, list], p: PrepareParams, built: Built, found: dict[str, str], seen: set) -> None:
    system = columns[found["system"]] if "system" in found else None
    built.fields = {"system"} if system is not None else set()
    for i, conv in enumerate(columns[found["messages"]]):
        built.examples_in += 1
        checked = _conversation(conv, built.tags)
        if isinstance(checked, str):
            built.dropped[checked] += 1
            continue
        turns, key, prompt_len, output_len, built.tags = checked
        ex = {"conversations": turns} | ({"system": text(system[i])} if system is not None else {})
        _keep(built, p, seen, ex, key, prompt_len, output_len)


def build_examples(
    columns: dict[str, list], table: TableParams, rules: PrepareParams, seen: set | None = None, where: str = "prepare"
) -> Built:
    """Turn table columns into examples, per the table's templates, columns or the aliases.

    `rules` gives the cleaning (dedup, length limits); `seen` the examples already kept from earlier sources, so a
    duplicate across sources is dropped too; `where` names the params key in error messages.
    """
    seen = set() if seen is None else seen
    found = None if table.templates else resolve_columns(list(columns), table.columns, where)
    built = Built("sharegpt" if found and "messages" in found else "alpaca")
    if built.kind == "sharegpt":
        _sharegpt(columns, rules, built, found, seen)
    else:
        templates = _check_templates(table, list(columns), where) if table.templates else None
        _alpaca(columns, rules, built, found, seen, templates)
    return built
