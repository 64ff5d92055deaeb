"""Small tables and params for the data tests: write a CSV/JSONL, build examples, make Q&A rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from llmft.data.mapping import build_examples
from llmft.data.tables import read_table
from llmft.params import PrepareParams

IDIOM_TEMPLATES = [
    {"instruction": "解释成语「{word}」的意思。", "output": "{explanation}"},
    {"instruction": "成语「{word}」怎么读？请给出拼音。", "output": "{pinyin}"},
]


def params(path, **data) -> PrepareParams:
    return PrepareParams(input=str(path), **data)


def csv(tmp_path, frame: dict | pd.DataFrame, name: str = "d.csv") -> Path:
    pd.DataFrame(frame).to_csv(tmp_path / name, index=False)
    return tmp_path / name


def jsonl(tmp_path, records: list[dict], name: str = "d.jsonl") -> Path:
    (tmp_path / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return tmp_path / name


def build(path, **data):
    p = params(path, **data)
    return build_examples(read_table(path).columns, p, p)


def qa(n: int, prefix: str = "问题") -> dict[str, list[str]]:
    return {"instruction": [f"{prefix}{i}" for i in range(n)], "output": [f"答案{i}" for i in range(n)]}


def conversation(question: str, answer: str, style: str = "from") -> list[dict]:
    if style == "from":
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def prompt_of(example: dict) -> tuple[str, str]:
    return example["instruction"], example["input"]
