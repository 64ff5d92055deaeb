"""tables.read_table: every supported format and encoding, and a clear UserError for everything else."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from llmft.common import UserError
from llmft.data.tables import read_table

ROWS = {
    "instruction": ["解释成语「画蛇添足」", "什么是 GBK？"],
    "output": ["比喻多此一举。", "一种中文编码，兼容 GB2312。"],
}
CSV = "instruction,output\n" + "".join(f"{i},{o}\n" for i, o in zip(ROWS["instruction"], ROWS["output"], strict=True))


def write(tmp_path, name: str, data: bytes | str):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


# --- formats --------------------------------------------------------------------------------------------------


def test_utf8_csv_is_read(tmp_path):
    table = read_table(write(tmp_path, "d.csv", CSV))
    assert table.columns == ROWS
    assert (table.format, table.encoding, table.num_rows) == ("csv", "utf-8", 2)


def test_tsv_is_read_and_commas_stay_inside_cells(tmp_path):
    table = read_table(write(tmp_path, "d.tsv", "instruction\toutput\n一，二, 三\ta,b\n"))
    assert table.columns == {"instruction": ["一，二, 三"], "output": ["a,b"]}
    assert table.format == "tsv"


def test_json_list_is_read_and_keeps_nested_values(tmp_path):
    records = [{"instruction": "你好", "output": "您好", "history": [["a", "b"]]}, {"instruction": "q", "output": 3}]
    table = read_table(write(tmp_path, "d.json", json.dumps(records, ensure_ascii=False)))
    assert table.columns == {"instruction": ["你好", "q"], "output": ["您好", 3], "history": [[["a", "b"]], None]}
    assert table.format == "json"


def test_json_wrapped_in_one_key_is_unwrapped(tmp_path):
    table = read_table(write(tmp_path, "d.json", json.dumps({"data": [{"instruction": "a", "output": "b"}]})))
    assert table.columns == {"instruction": ["a"], "output": ["b"]}


def test_jsonl_is_read_skipping_blank_lines_and_filling_missing_keys(tmp_path):
    lines = '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d", "system": "s"}\n'
    table = read_table(write(tmp_path, "d.jsonl", lines))
    assert table.columns == {"instruction": ["a", "c"], "output": ["b", "d"], "system": [None, "s"]}
    assert table.format == "jsonl"


def test_json_lines_saved_as_json_are_read(tmp_path):
    lines = '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n'
    table = read_table(write(tmp_path, "d.json", lines))
    assert table.columns == {"instruction": ["a", "c"], "output": ["b", "d"]}


def test_parquet_is_read_with_list_cells_as_plain_lists(tmp_path):
    conv = [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "您好"}]
    frame = pd.DataFrame({"conversations": [conv], "n": [7], "ids": [[1, 2]], "missing": [None]})
    frame.to_parquet(tmp_path / "d.parquet")
    table = read_table(tmp_path / "d.parquet")
    assert table.columns == {"conversations": [conv], "n": [7], "ids": [[1, 2]], "missing": [None]}
    assert type(table.columns["conversations"][0]) is list and type(table.columns["conversations"][0][0]) is dict
    assert json.dumps(table.columns["ids"]) == "[[1, 2]]"  # plain ints, not NumPy scalars
    assert (table.format, table.encoding) == ("parquet", None)


def test_xlsx_is_read_with_numbers_as_text(tmp_path):
    pd.DataFrame({"instruction": ["你好", "一加一"], "output": ["您好", 2]}).to_excel(tmp_path / "d.xlsx", index=False)
    table = read_table(tmp_path / "d.xlsx")
    assert table.columns == {"instruction": ["你好", "一加一"], "output": ["您好", "2"]}
    assert table.format == "xlsx"


def test_xlsx_sheet_is_chosen_by_name_or_index(tmp_path):
    with pd.ExcelWriter(tmp_path / "d.xlsx") as writer:
        pd.DataFrame({"instruction": ["first"], "output": ["1"]}).to_excel(writer, sheet_name="a", index=False)
        pd.DataFrame({"instruction": ["second"], "output": ["2"]}).to_excel(writer, sheet_name="b", index=False)
    assert read_table(tmp_path / "d.xlsx", sheet="b").columns["instruction"] == ["second"]
    assert read_table(tmp_path / "d.xlsx", sheet=1).columns["instruction"] == ["second"]
    assert read_table(tmp_path / "d.xlsx").columns["instruction"] == ["first"]


def test_missing_xlsx_sheet_is_a_user_error(tmp_path):
    pd.DataFrame({"instruction": ["a"], "output": ["b"]}).to_excel(tmp_path / "d.xlsx", index=False)
    with pytest.raises(UserError, match="nosuch"):
        read_table(tmp_path / "d.xlsx", sheet="nosuch")


def test_na_like_cells_and_leading_zeros_stay_text(tmp_path):
    table = read_table(write(tmp_path, "d.csv", "instruction,output\nNA,0012\nnull,无\n,None\n"))
    assert table.columns == {"instruction": ["NA", "null", ""], "output": ["0012", "无", "None"]}


@pytest.mark.parametrize(
    ("name", "data", "fmt"),
    [
        ("d", b'[{"instruction": "a", "output": "b"}]', "json"),
        ("d.txt", b'\xef\xbb\xbf  {"instruction": "a", "output": "b"}\n', "jsonl"),
    ],
)
def test_text_format_is_sniffed_without_a_known_extension(tmp_path, name, data, fmt):
    table = read_table(write(tmp_path, name, data))
    assert table.format == fmt
    assert table.columns == {"instruction": ["a"], "output": ["b"]}


def test_binary_formats_are_sniffed_by_magic_bytes(tmp_path):
    frame = pd.DataFrame({"instruction": ["a"], "output": ["b"]})
    frame.to_parquet(tmp_path / "p.parquet")
    frame.to_excel(tmp_path / "x.xlsx", index=False)
    (tmp_path / "p.parquet").rename(tmp_path / "p_data")
    (tmp_path / "x.xlsx").rename(tmp_path / "x_data")
    assert read_table(tmp_path / "p_data").format == "parquet"
    assert read_table(tmp_path / "x_data").format == "xlsx"


def test_explicit_format_overrides_the_extension(tmp_path):
    table = read_table(write(tmp_path, "d.txt", "instruction\toutput\na\tb\n"), fmt="tsv")
    assert table.columns == {"instruction": ["a"], "output": ["b"]}


# --- encodings ------------------------------------------------------------------------------------------------


def test_utf8_bom_csv_is_read_without_the_bom_in_the_header(tmp_path):
    table = read_table(write(tmp_path, "d.csv", b"\xef\xbb\xbf" + CSV.encode("utf-8")))
    assert table.columns == ROWS
    assert table.encoding == "utf-8-sig"


@pytest.mark.parametrize("codec", ["gbk", "gb18030"])
def test_gbk_csv_is_read(tmp_path, codec):
    table = read_table(write(tmp_path, "d.csv", CSV.encode(codec)))
    assert table.columns == ROWS
    assert table.encoding == "gb18030"  # a superset of GBK, so one codec reads both


def test_gb18030_only_characters_are_read(tmp_path):
    # 𠮷 and € are not in GBK; GB18030 encodes both
    table = read_table(write(tmp_path, "d.csv", "instruction,output\n𠮷是什么字,读作 jí，€\n".encode("gb18030")))
    assert table.columns == {"instruction": ["𠮷是什么字"], "output": ["读作 jí，€"]}


def test_gbk_tsv_and_jsonl_are_read(tmp_path):
    tsv = read_table(write(tmp_path, "d.tsv", "instruction\toutput\n你好\t您好\n".encode("gbk")))
    jsonl = read_table(write(tmp_path, "d.jsonl", '{"instruction": "你好", "output": "您好"}\n'.encode("gbk")))
    assert tsv.columns == jsonl.columns == {"instruction": ["你好"], "output": ["您好"]}


def test_encoding_set_in_params_is_used(tmp_path):
    path = write(tmp_path, "d.csv", CSV.encode("gbk"))
    assert read_table(path, encoding="gbk").columns == ROWS
    assert read_table(path, encoding="gbk").encoding == "gbk"


def test_wrong_encoding_set_in_params_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"d\.csv: cannot be decoded as utf-8 .*set prepare\.encoding: auto"):
        read_table(write(tmp_path, "d.csv", CSV.encode("gbk")), encoding="utf-8")


def test_utf16_with_bom_is_read(tmp_path):
    # Excel's "Unicode Text" export; its NUL bytes must not be taken for a binary file
    table = read_table(write(tmp_path, "d.tsv", "instruction\toutput\n你好\t您好\n".encode("utf-16")))
    assert table.columns == {"instruction": ["你好"], "output": ["您好"]}


# --- bad input ------------------------------------------------------------------------------------------------


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"nope\.csv: file not found; set prepare\.input"):
        read_table(tmp_path / "nope.csv")


@pytest.mark.parametrize("data", [b"", b"  \n\t\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n"])
def test_empty_file_is_a_user_error(tmp_path, data):
    with pytest.raises(UserError, match=r"d\.csv: file is empty"):
        read_table(write(tmp_path, "d.csv", data))


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("d.csv", "instruction,output\n"),
        ("d.json", "[]"),
        ("d.jsonl", "\n{}\n"),
    ],
)
def test_table_without_data_rows_is_a_user_error(tmp_path, name, data):
    with pytest.raises(UserError, match="no data rows"):
        read_table(write(tmp_path, name, data))


def test_binary_file_is_refused_not_decoded(tmp_path):
    with pytest.raises(UserError, match=r"d\.csv: looks like a binary file"):
        read_table(write(tmp_path, "d.csv", bytes(range(256)) * 4))


def test_unknown_format_is_a_user_error_listing_the_formats(tmp_path):
    with pytest.raises(
        UserError, match=r"d\.bin: unknown format \(extension '\.bin'\); set prepare\.format to one of .*"
    ):
        read_table(write(tmp_path, "d.bin", "just some words\n"))


def test_corrupt_xlsx_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"d\.xlsx: cannot be read as xlsx"):
        read_table(write(tmp_path, "d.xlsx", "instruction,output\na,b\n"))


def test_bad_jsonl_line_is_named_by_its_number(tmp_path):
    lines = '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": }\n'
    with pytest.raises(UserError, match=r"d\.jsonl: line 3 is not valid JSON .*fix or delete that line"):
        read_table(write(tmp_path, "d.jsonl", lines))


def test_jsonl_line_that_is_not_an_object_is_named(tmp_path):
    with pytest.raises(UserError, match=r"d\.jsonl: line 2 is a list, expected an object"):
        read_table(write(tmp_path, "d.jsonl", '{"instruction": "a", "output": "b"}\n["c", "d"]\n'))


def test_invalid_json_names_the_line(tmp_path):
    with pytest.raises(UserError, match=r"d\.json: invalid JSON at line 3"):
        read_table(write(tmp_path, "d.json", '[\n{"instruction": "a", "output": "b"},\n{"instruction": }\n]'))


def test_json_that_is_not_a_list_of_objects_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="expected a JSON list of objects, got a str"):
        read_table(write(tmp_path, "d.json", '"hello"'))


def test_malformed_csv_row_is_a_user_error_in_one_line(tmp_path):
    with pytest.raises(UserError, match=r"d\.csv: cannot be read as csv") as err:
        read_table(write(tmp_path, "d.csv", "instruction,output\na,b\nc,d,e,f\n"))
    assert "\n" not in str(err.value)
