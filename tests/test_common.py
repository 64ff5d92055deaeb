"""Helpers every stage shares (src/llmft/common.py, src/llmft/env.py): atomic writes, JSON style, one-line errors."""

from __future__ import annotations

import json

import pytest

from llmft.common import UserError, atomic_path, atomic_write_json, dump_json, read_json, run_main
from llmft.env import available_memory, dvc, environment, write_environment


def test_atomic_path_replaces_a_directory_in_one_rename(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
        assert not (out / "new.txt").exists()  # nothing visible until the block ends
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind


def test_a_crash_inside_atomic_path_leaves_the_old_output_and_no_temporary(tmp_path):
    out = tmp_path / "metrics.json"
    atomic_write_json(out, {"loss": 1.0})
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert read_json(out) == {"loss": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_json_style_keeps_chinese_readable_and_puts_one_list_item_per_line():
    text = dump_json([{"instruction": "解释成语", "output": "意思"}, {"instruction": "b", "output": "c"}])
    assert "解释成语" in text and "\\u" not in text
    assert text.splitlines()[0] == "[" and len(text.splitlines()) == 4 and text.endswith("]\n")
    assert json.loads(dump_json({"a": [1, 2]})) == {"a": [1, 2]}
    assert dump_json([]) == "[]\n"


def test_user_error_is_one_line_and_exit_code_2(capsys):
    def main(argv):
        raise UserError("prepare.input: file not found")

    assert run_main(main, []) == 2
    assert capsys.readouterr().err == "error: prepare.input: file not found\n"
    assert run_main(lambda argv: None, []) == 0


@pytest.mark.integration
def test_a_failed_dvc_command_names_the_command_and_dvcs_last_line(tmp_path):
    with pytest.raises(UserError, match=r"^dvc status failed: .*") as err:
        dvc("status", cwd=tmp_path)  # not a DVC repository
    assert "\n" not in str(err.value)


def test_environment_manifest_has_no_timestamp_and_lists_packages(tmp_path):
    path = tmp_path / "env.json"
    write_environment(path, "prepare")
    first = path.read_bytes()
    write_environment(path, "prepare")
    assert path.read_bytes() == first  # the same machine and code write the same bytes: DVC sees no change
    env = read_json(path)
    assert env["stage"] == "prepare" and env["packages"]["pydantic"] and env["device"].startswith(("cpu", "cuda"))
    assert set(environment()) >= {"git_commit", "python", "packages"}


def test_available_memory_reads_memavailable():
    assert available_memory() > 2**20  # Linux: /proc/meminfo; the decoder packs weights only when this is known


def test_the_library_never_imports_a_tool_or_a_stage():
    """Layers point down: stages (src/*.py) and tools (llmft/tools/) import the library, never the reverse."""
    import re

    from scripts import ROOT

    upward = re.compile(r"^\s*(from|import)\s+llmft\.tools\b|^\s*from\s+llmft\s+import\s+tools\b", re.M)
    library = [p for p in (ROOT / "src/llmft").rglob("*.py") if "tools" not in p.relative_to(ROOT / "src/llmft").parts]
    assert library and not [str(p) for p in library if upward.search(p.read_text(encoding="utf-8"))]
