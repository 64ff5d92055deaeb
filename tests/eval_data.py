"""Val/test rows and params for the evaluate and inference tests, and how to write them as a prepared split."""

from __future__ import annotations

import json
from pathlib import Path

VAL = [
    {"instruction": "解释成语「冰寒于水」的意思。", "input": "", "output": "冰比水冷。指后来居上。"},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {
        "instruction": "Translate to English",
        "input": "你好，世界",
        "output": "Hello, world!",
        "history": [["Hi", "Hello! How can I help?"]],
    },
    {"instruction": "成语「板板六十四」怎么读？", "input": "", "output": "bǎn bǎn liù shí sì", "system": "Be brief."},
    {"instruction": "Count to three.", "input": "", "output": "1, 2, 3"},
]


INFO = {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"}


def write_data(data_dir: Path, val, test=None) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    splits = {"val": val} | ({"test": test} if test is not None else {})
    for name, rows in splits.items():
        (data_dir / f"{name}.json").write_text(rows if isinstance(rows, str) else json.dumps(rows, ensure_ascii=False))
    info = {name: {"file_name": f"{name}.json", "columns": INFO} for name in splits}
    (data_dir / "dataset_info.json").write_text(json.dumps(info))
    return data_dir


def write_params(path: Path, variables: dict | None = None, **eval_params) -> Path:
    eval_params = {"max_new_tokens": 6, "batch_size": 2, "num_threads": 1, "kept": {"prompts": None}} | eval_params
    data = {"input": "unused.csv", "variables": variables or {}}
    path.write_text(json.dumps({"prepare": data, "evaluate": eval_params}, ensure_ascii=False))  # JSON is YAML
    return path
