"""Read a raw table (CSV, TSV, JSON, JSONL, Parquet, Excel) into columns of Python values.

Text files may be UTF-8, UTF-8 with BOM, or GBK/GB18030 (what Excel on a Chinese
Windows saves); `encoding: auto` tries them in that order (and reads UTF-16 when the file
starts with its BOM, as Excel's "Unicode Text" export does). Every cell of a text
table stays a string: "NA", "无" or "0012" are data, not missing values.
"""

from __future__ import annotations

import codecs
import io
import json
from dataclasses import dataclass
from pathlib import Path

from llmft.common import UserError

EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".xlsx": "xlsx",
    ".xlsm": "xlsx",
}
AUTO_ENCODINGS = ("utf-8-sig", "gb18030")  # utf-8-sig also reads plain UTF-8; GB18030 is a superset of GBK


@dataclass
class Table:
    columns: dict[str, list]  # column name -> values, all columns the same length
    format: str
    encoding: str | None

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.columns.values()), []))


def sniff_format(path: Path, head: bytes) -> str:
    if path.suffix.lower() in EXTENSIONS:
        return EXTENSIONS[path.suffix.lower()]
    if head.startswith(b"PK\x03\x04"):
        return "xlsx"
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"["):
        return "json"
    if text.startswith(b"{"):
        return "jsonl"
    raise UserError(
        f"{path}: unknown format (extension {path.suffix!r}); "
        f"set prepare.format to one of {sorted(set(EXTENSIONS.values()))}"
    )


def decode(path: Path, raw: bytes, encoding: str) -> tuple[str, str]:
    """Return (text, encoding used). Binary content is refused instead of decoded into garbage."""
    if encoding == "auto" and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        encoding = "utf-16"  # Excel's "Unicode Text" export; its NUL bytes would look binary below
    wide = encoding != "auto" and codecs.lookup(encoding).name.startswith("utf-16")
    if b"\x00" in raw[:8192] and not wide:
        raise UserError(
            f"{path}: looks like a binary file, not text; expected CSV/TSV/JSON/JSONL, or a .parquet/.xlsx extension"
        )
    for enc in AUTO_ENCODINGS if encoding == "auto" else (encoding,):
        try:
            text = raw.decode(enc)
        except UnicodeDecodeError as exc:
            if encoding != "auto":
                raise UserError(
                    f"{path}: cannot be decoded as {encoding} (byte {exc.start}); set prepare.encoding: auto"
                ) from None
            continue
        return text.removeprefix("\ufeff"), "utf-8" if enc == "utf-8-sig" and not raw.startswith(
            b"\xef\xbb\xbf"
        ) else enc
    raise UserError(f"{path}: not UTF-8 or GB18030 text; set prepare.encoding to the file's encoding")


def _records_to_columns(records: list, path: Path, where) -> dict[str, list]:
    columns: dict[str, list] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: {where(i)} is a {type(rec).__name__}, expected an object with named fields")
        for key in rec:
            columns.setdefault(str(key), [None] * i)
        for key, values in columns.items():
            values.append(rec.get(key))
    return columns


def _read_json(path: Path, text: str) -> dict[str, list]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(path, text)  # JSON Lines saved with a .json extension
        raise UserError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} wrappers
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of objects, got a {type(data).__name__}")
    return _records_to_columns(data, path, lambda i: f"item {i}")


def _read_jsonl(path: Path, text: str) -> dict[str, list]:
    records, lines = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {lineno} is not valid JSON ({exc.msg}); fix or delete that line") from None
        lines.append(lineno)
    return _records_to_columns(records, path, lambda i: f"line {lines[i]}")


def _plain(value):
    """Parquet list/struct cells arrive as NumPy arrays and scalars; make them what JSON would give."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, dict) else value


def _frame_to_columns(frame) -> dict[str, list]:
    frame = frame.astype(object).where(frame.notna(), None)
    return {str(name): [_plain(v) for v in frame[name].tolist()] for name in frame.columns}


def read_table(path: str | Path, fmt: str = "auto", encoding: str = "auto", sheet: int | str = 0) -> Table:
    """Read `path` into a Table.

    Raises:
        UserError: missing, empty, binary or unparsable file, with the reason and the fix.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; set prepare.input in params.yaml to your table")
    raw = path.read_bytes()
    if not raw.removeprefix(b"\xef\xbb\xbf").strip():
        raise UserError(f"{path}: file is empty; put a header row and at least one data row in it")
    fmt = sniff_format(path, raw[:64]) if fmt == "auto" else fmt
    used = None
    try:
        if fmt == "parquet":
            columns = _frame_to_columns(pd.read_parquet(io.BytesIO(raw)))
        elif fmt == "xlsx":
            columns = _frame_to_columns(
                pd.read_excel(io.BytesIO(raw), sheet_name=sheet, dtype=str, keep_default_na=False)
            )
        else:
            text, used = decode(path, raw, encoding)
            if fmt == "json":
                columns = _read_json(path, text)
            elif fmt == "jsonl":
                columns = _read_jsonl(path, text)
            else:
                frame = pd.read_csv(
                    io.StringIO(text),
                    sep="\t" if fmt == "tsv" else ",",
                    dtype=str,
                    keep_default_na=False,
                    na_filter=False,
                )
                columns = {str(c): frame[c].tolist() for c in frame.columns}
    except UserError:
        raise
    except Exception as exc:  # a parser's own error: keep its words, name the file and format
        raise UserError(
            f"{path}: cannot be read as {fmt}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    table = Table(columns, fmt, used)
    if not columns or table.num_rows == 0:
        raise UserError(f"{path}: no data rows (read as {fmt})")
    return table
