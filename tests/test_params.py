"""params.yaml schema: the repo's own file validates; a mistake is one line naming key, value and what is allowed."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import yaml

from llmft.common import UserError
from llmft.params import Params, load_params, parse_params

ROOT = Path(__file__).resolve().parent.parent
PARAMS_YAML = ROOT / "params.yaml"
REPO_PARAMS = yaml.safe_load(PARAMS_YAML.read_text(encoding="utf-8"))


def with_value(section: str, key: str, value) -> dict:
    raw = copy.deepcopy(REPO_PARAMS)
    raw.setdefault(section, {})[key] = value
    return raw


def error_of(raw) -> str:
    with pytest.raises(UserError) as err:
        parse_params(raw)
    return str(err.value)


def test_repo_params_yaml_validates():
    params = load_params(PARAMS_YAML)
    assert [t.path for t in params.prepare.tables()] == [s["path"] for s in REPO_PARAMS["prepare"]["sources"]]
    idioms = next(t for t in params.prepare.tables() if t.templates)
    assert all(t.instruction and t.output for t in idioms.templates)
    assert params.prepare.variables["name"] and any("{{name}}" in e for p in params.evaluate.probes for e in p.expect)
    assert params.train.learning_rate == pytest.approx(float(REPO_PARAMS["train"]["learning_rate"]))


def literal_values(annotation) -> set:
    """The values a Literal (or Optional[Literal], Literal[None, ...]) field allows."""
    if annotation is type(None):
        return {None}
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    return {v for arg in typing.get_args(annotation) for v in literal_values(arg)}


def test_choices_comments_in_params_yaml_match_the_schema():
    section, checked = None, 0
    for line in PARAMS_YAML.read_text(encoding="utf-8").splitlines():
        if re.match(r"^\w+:", line):
            section = line.split(":")[0]
        found = re.match(r"^\s+(\w+):.*# choices: (\[.*?\])", line)
        if found:
            model = Params.model_fields[section].annotation
            assert set(yaml.safe_load(found[2])) == literal_values(model.model_fields[found[1]].annotation), line
            checked += 1
    assert checked >= 4


def test_only_the_prepare_section_is_required():
    params = parse_params({"prepare": {"input": "x.csv"}})
    assert (params.train.finetuning_type, params.prepare.val_size, params.prepare.test_size) == ("lora", 0.1, 0)


@pytest.mark.parametrize(
    ("section", "key", "value", "allowed"),
    [
        ("train", "learning_rate", -1e-5, "greater than 0"),
        ("train", "lora_rank", 0, "greater than or equal to 1"),
        ("prepare", "val_size", 1.5, "a split ratio must be between 0 and 1"),
        ("prepare", "val_size", 0, "a split count must be >= 1"),
        ("prepare", "test_size", -1, "a split count must be >= 0"),
        ("train", "finetuning_type", "qlora", "Input should be 'lora', 'full' or 'freeze'"),
        ("train", "lr_scheduler_type", "step", "'cosine', 'linear'"),
        ("train", "precision", "int8", "'auto', 'bf16', 'fp16' or 'fp32'"),
        ("train", "quantization_bit", 3, "Input should be 4 or 8"),
        ("train", "warmup_ratio", 1.0, "less than 1"),
        ("train", "lora_rank", "eight", "valid integer"),
        ("train", "num_train_epochs", [3], "valid number"),
        ("prepare", "dedup", "maybe", "valid boolean"),
        ("prepare", "format", "xls", "'parquet' or 'xlsx'"),
        ("prepare", "encoding", "klingon", "use auto, utf-8, utf-8-sig, gbk or gb18030"),
        ("prepare", "max_prompt_chars", 0, "greater than or equal to 1"),
        ("export", "max_shard_size", "2 gigs", "use a size like 500MB or 2GB"),
    ],
)
def test_bad_value_names_key_value_and_what_is_allowed(section, key, value, allowed):
    msg = error_of(with_value(section, key, value))
    assert msg.startswith(f"params.yaml: {section}.{key} = {value!r} is not allowed: ")
    assert allowed in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {**REPO_PARAMS, "trian": {}},
            "unknown key 'trian'; allowed keys here: prepare, model, rehearse, train, prefer, evaluate, export, ",
        ),
        (
            with_value("train", "lora_rnak", 8),
            "unknown key 'train.lora_rnak'; allowed keys here: finetuning_type, lora_",
        ),
        (
            with_value("prepare", "shuffle", True),
            "unknown key 'prepare.shuffle'; allowed keys here: format, encoding, sheet, columns, templates, input, "
            "sources",
        ),
    ],
)
def test_unknown_key_is_named_with_the_allowed_keys(raw, expected):
    assert expected in error_of(raw)


def test_every_bad_key_is_named_in_one_line():
    raw = with_value("train", "lora_rank", 0)
    raw["prepare"]["val_size"] = 1.5
    raw["evaluate"]["bogus"] = 1
    msg = error_of(raw)
    assert "\n" not in msg
    assert "prepare.val_size = 1.5" in msg and "train.lora_rank = 0" in msg and "unknown key 'evaluate.bogus'" in msg


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {}}, "params.yaml: prepare is required"),
        (
            {"data": {"input": "x.csv"}, "rehearsal": {}, "eval": {}},
            "params.yaml: sections are named after their stage: `data:` is now `prepare:`, "
            "`rehearsal:` is now `rehearse:`, `eval:` is now `evaluate:`; rename them",
        ),
        ({"prepare": {}}, "params.yaml: prepare = {} is not allowed: set prepare.input (one table) or prepare.sources"),
        (["data"], "expected a mapping of sections (prepare, model, train, ...), got list"),
        (None, "got NoneType"),
    ],
)
def test_missing_or_malformed_sections_are_named(raw, expected):
    assert expected in error_of(raw)


@pytest.mark.parametrize(("val", "test"), [(0.1, 0), (50, 0), (0.05, 0.05), (1, 10)])
def test_split_sizes_are_accepted_as_ratio_or_count(val, test):
    prepare = parse_params({"prepare": {"input": "x.csv", "val_size": val, "test_size": test}}).prepare
    assert (prepare.val_size, prepare.test_size) == (val, test)
    assert (type(prepare.val_size), type(prepare.test_size)) == (type(val), type(test))  # 50 stays a count, 0.1 a ratio


def test_load_params_reports_a_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match=r"nope\.yaml: file not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("prepare:\n  input: [unclosed\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.yaml: not valid YAML") as err:
        load_params(tmp_path / "bad.yaml")
    assert "\n" not in str(err.value)


def run_validator(path: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "llmft.params", "--file", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc, time.monotonic() - start


@pytest.mark.integration
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("prepare:\n  input: x.csv\ntrain:\n  learning_rate: -0.1\n", "train.learning_rate = -0.1 is not allowed"),
        ("prepare:\n  input: x.csv\n  val_size: 1.5\n", "prepare.val_size = 1.5 is not allowed"),
        ("prepare:\n  input: x.csv\n  typo: 1\n", "unknown key 'prepare.typo'"),
    ],
    ids=["negative_lr", "val_ratio_over_1", "unknown_key"],
)
def test_validator_cli_exits_2_in_under_two_seconds(tmp_path, text, expected):
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    proc, seconds = run_validator(path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert seconds < 2, f"params.py took {seconds:.2f} s; it must stay well under 2 s (no heavy imports)"


@pytest.mark.integration
def test_validator_cli_accepts_the_repo_params_yaml():
    proc, seconds = run_validator(PARAMS_YAML)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("params.yaml: OK")
    assert seconds < 2


# params.yaml keys whose value is the demo's own, not a default for any data set: the schema keeps the neutral one.
DEMO_VALUES = {
    "prepare.sources": "the demo's two tables",
    "prepare.variables": "the demo's persona",
    "prepare.val_size": "16 of the demo's 139 examples; the schema's 0.1 suits any table",
    "evaluate.probes": "questions about the demo's persona",
}


def _differences(model_cls, values: dict, prefix: str) -> dict[str, tuple]:
    """{key: (schema default, params.yaml value)} for every key of `values` whose default differs."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    found = {}
    for name, field in model_cls.model_fields.items():
        ann, default = field.annotation, field.get_default()
        if isinstance(ann, type) and issubclass(ann, BaseModel) and isinstance(values.get(name), dict):
            found |= _differences(ann, values[name], f"{prefix}{name}.")
        elif name in values and default is not PydanticUndefined and default != values[name]:
            found[prefix + name] = (default, values[name])
    return found


def test_schema_defaults_equal_params_yaml_except_the_demos_own_values():
    from llmft.params import Params

    raw = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text(encoding="utf-8"))
    differ = {}
    for section, values in raw.items():
        differ |= _differences(Params.model_fields[section].annotation, values, section + ".")
    assert set(differ) == set(DEMO_VALUES), {k: v for k, v in differ.items() if k not in DEMO_VALUES}
