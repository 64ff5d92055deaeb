"""Helpers shared by every stage: user-facing errors, logging, atomic writes, seeding.

from llmft.common import UserError, atomic_write_json, get_logger, run_main
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the repo: src/llmft/common.py


class UserError(Exception):
    """A mistake the user can fix (bad file, bad column, bad param).

    `run_main` prints it as one line, without a traceback, and exits with status 2.
    """


def get_logger(name: str) -> logging.Logger:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    return logging.getLogger(name)


def stage_parser(doc: str, stage: str | None) -> argparse.ArgumentParser:
    """The parser every stage script starts from: --params and, for a stage that writes its environment manifest,
    --env, each with one name and default across stages. Inputs and outputs are named alike everywhere: --base
    (the base model folder), --data-dir (the splits), --adapter, --out, --metrics."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", type=Path, help="the params file (params.yaml)")
    if stage:
        parser.add_argument("--env", default=f"reports/env/{stage}.json", type=Path, help="environment manifest")
    return parser


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a stage's `main`, turning a `UserError` into a one-line message and exit code 2."""
    try:
        return main(argv) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success move it into place in one rename.

    Works for files and directories. On any exception the temporary is removed and an
    existing `path` is left untouched, so a crash never leaves a half-written output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            old = tmp / ".old"
            os.replace(path, old)  # a directory can't be renamed over a non-empty one
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def dump_json(obj: Any) -> str:
    """The one JSON style of the repo: UTF-8 text (Chinese stays readable, not \\u-escaped), final newline.

    A list is written one item per line: diffs show changed examples, and the C encoder
    is used (an indented dump goes through the pure-Python one, ~5x slower on a big split).
    """
    if isinstance(obj, list):
        if not obj:
            return "[]\n"
        return "[\n" + ",\n".join(json.dumps(item, ensure_ascii=False) for item in obj) + "\n]\n"
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"


def write_json(path: Path, obj: Any) -> None:
    path.write_text(dump_json(obj), encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        write_json(tmp, obj)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (when installed) from one params value."""
    random.seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


def read_json(path: str | os.PathLike) -> Any:
    """A UTF-8 JSON file (the stages' records); errors are the caller's to explain."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
