"""The schema of params.yaml: one section per stage, checked before any stage does work.

    python -m llmft.params               # validate params.yaml (also: make check)
    python -m llmft.params --file other.yaml

Every stage calls `load_params()` first, so an unknown key, a wrong type or an
out-of-range value stops the pipeline in well under two seconds, with one message
that names the key, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import codecs
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmft.common import UserError, run_main

ALPACA_FIELDS = ("instruction", "input", "output", "system", "history")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# A float in (0, 1) is a fraction of the examples; an integer >= 1 is a count (LLaMA-Factory's val_size convention).
SplitSize = int | float


def _check_split(name: str, value: SplitSize, allow_zero: bool) -> SplitSize:
    least = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number: a ratio in (0, 1) or an integer count >= {least}")
    if isinstance(value, float) and not (0 < value < 1) and not (allow_zero and value == 0):
        raise ValueError(
            f"a split ratio must be between 0 and 1 (exclusive), or an integer count >= {least}; got {value}"
        )
    if isinstance(value, int) and value < (0 if allow_zero else 1):
        raise ValueError(f"a split count must be >= {0 if allow_zero else 1}; got {value}")
    return value


class Template(Section):
    """Builds one Alpaca example from one source row; `{column}` placeholders name table columns."""

    instruction: str = Field(min_length=1)
    output: str = Field(min_length=1)
    input: str = ""
    system: str = ""


class TableParams(Section):
    """How to read one table and turn its rows into examples (shared by prepare: and each prepare.sources item)."""

    format: Literal["auto", "csv", "tsv", "json", "jsonl", "parquet", "xlsx"] = "auto"
    encoding: str = "auto"
    sheet: int | str = 0
    columns: dict[Literal["instruction", "input", "output", "system", "history", "messages"], str] = {}
    templates: list[Template] = []

    @field_validator("encoding")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        if value != "auto":
            try:
                codecs.lookup(value)
            except LookupError:
                raise ValueError(f"unknown encoding {value!r}; use auto, utf-8, utf-8-sig, gbk or gb18030") from None
        return value

    @model_validator(mode="after")
    def _one_mapping(self) -> TableParams:
        if self.columns and self.templates:
            raise ValueError("set columns or templates, not both (templates can name any column)")
        return self


VARIABLE = re.compile(r"\w+")


def _check_variables(value: dict[str, str]) -> dict[str, str]:
    for key in value:
        if not VARIABLE.fullmatch(key):
            raise ValueError(f"a variable name is letters, digits and _ (it fills {{{{{key}}}}}); got {key!r}")
    return value


class SourceParams(TableParams):
    """One input table of prepare.sources: its own path, reading and mapping, variables and row cap."""

    path: str = Field(min_length=1)
    name: str | None = Field(default=None, pattern=r"^[\w.-]+$")  # default: the file name without extension
    variables: dict[str, str] = {}  # {{key}} in the table's cells -> value; wins over prepare.variables
    max_rows: int | None = Field(default=None, ge=1)  # read only the first N rows; the rest are counted as dropped

    _vars = field_validator("variables")(classmethod(lambda cls, v: _check_variables(v)))

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


class PrepareParams(TableParams):
    input: str | None = Field(default=None, min_length=1)  # one table; or several in `sources`
    sources: list[SourceParams] = []
    variables: dict[str, str] = {}  # {{key}} placeholders filled in every source's cells
    dedup: bool = True
    max_prompt_chars: int | None = Field(default=None, ge=1)
    max_output_chars: int | None = Field(default=None, ge=1)
    val_size: SplitSize = 0.1
    test_size: SplitSize = 0
    seed: int = 42

    _vars = field_validator("variables")(classmethod(lambda cls, v: _check_variables(v)))

    # mode="before": see the raw YAML value, so `true` is not silently read as the count 1.
    @field_validator("val_size", mode="before")
    @classmethod
    def _val(cls, value: SplitSize) -> SplitSize:
        return _check_split("val_size", value, allow_zero=False)

    @field_validator("test_size", mode="before")
    @classmethod
    def _test(cls, value: SplitSize) -> SplitSize:
        return _check_split("test_size", value, allow_zero=True)

    @model_validator(mode="after")
    def _input_or_sources(self) -> PrepareParams:
        if bool(self.input) == bool(self.sources):
            raise ValueError("set prepare.input (one table) or prepare.sources (a list of tables), exactly one of them")
        if self.sources and (self.columns or self.templates or self.model_fields_set & {"format", "encoding", "sheet"}):
            raise ValueError("with prepare.sources, set format/encoding/sheet/columns/templates in each source")
        labels = [s.label for s in self.sources]
        if len(set(labels)) != len(labels):
            raise ValueError(f"prepare.sources names must differ (a name defaults to the file name); got {labels}")
        return self

    def tables(self) -> list[SourceParams]:
        """Every input table as a source; the single `prepare.input` form is one source named after its file."""
        if self.sources:
            return list(self.sources)
        table = {k: getattr(self, k) for k in TableParams.model_fields}
        return [SourceParams(path=self.input, **table)]


class ModelParams(Section):
    name_or_path: str = Field(default="embedded", min_length=1)
    template: str = Field(default="auto", min_length=1)
    trust_remote_code: bool = False
    copy_weights: bool = False


class TrainParams(Section):
    finetuning_type: Literal["lora", "full", "freeze"] = "lora"
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    lora_target: str = "all"
    use_dora: bool = False
    use_rslora: bool = False
    quantization_bit: Literal[4, 8] | None = None
    per_device_train_batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    num_train_epochs: float = Field(default=2.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    max_samples: int | None = Field(default=None, ge=1)
    lr_scheduler_type: Literal[
        "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt"
    ] = "cosine"
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    cutoff_len: int = Field(default=512, ge=8)
    logging_steps: int = Field(default=2, ge=1)
    save_steps: int = Field(default=1000, ge=1)
    save_total_limit: int | None = Field(default=2, ge=1)
    eval_steps: int = Field(default=16, ge=1)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    deepspeed: Literal[None, "z2", "z3"] = None
    oom_backoff: bool = True
    nproc: int | Literal["auto"] = "auto"  # processes per node: auto = one per GPU, 1 on a CPU (lf/world.py)
    nnodes: int = Field(default=1, ge=1)  # nodes; each runs `make train` with its NODE_RANK and MASTER_ADDR
    profile: Literal["auto", "fast", "plain"] = "auto"
    cpu_token_budget: int | None = Field(default=65000, ge=1)  # CPU only: cut a run at this many tokens; null = none
    seed: int = 42
    extra: dict[str, Any] = {}

    @field_validator("nproc")
    @classmethod
    def _positive_nproc(cls, v: int | str) -> int | str:
        if v != "auto" and v < 1:
            raise ValueError("processes per node: a whole number >= 1, or auto (one per GPU, 1 on a CPU)")
        return v


class Probe(Section):
    """A prompt both models answer, with what a tuned answer should contain (any of `expect`, any case)."""

    prompt: str = Field(min_length=1)
    expect: list[str] = []  # {{key}} is filled from prepare.variables; empty = shown, not scored

    @field_validator("expect", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class KeptParams(Section):
    """What fine-tuning must not change: held-out everyday prompts that ask nothing the training data teaches."""

    prompts: str | None = Field(default="data/prompts/everyday.jsonl", min_length=1)  # JSONL; null = not measured
    max_leak: float = Field(default=5.0, ge=0, le=100)  # warn "forgot" when the tuned model names the persona in
    min_facts_kept: float = Field(default=90.0, ge=0, le=100)  # more % of answers, or keeps fewer % of the facts


# evaluate.max_examples: auto on a CPU: each example is answered by both models (up to evaluate.max_new_tokens each) and
# scored teacher-forced, so a long val split of a large table would take most of a CPU run. The cap is stated in
# eval.json (`examples` against `examples_available`) and the report; a GPU answers them all.
CPU_MAX_EXAMPLES = 64


class EvaluateParams(Section):
    max_new_tokens: int = Field(default=64, ge=1)
    batch_size: int = Field(default=16, ge=1)
    max_examples: int | Literal["auto"] | None = "auto"  # auto = CPU_MAX_EXAMPLES on a CPU, all on a GPU
    cutoff_len: int = Field(default=2048, ge=8)
    backend: Literal["hf", "vllm"] = "hf"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    num_threads: int = Field(default=0, ge=0)
    probes: list[Probe] = []
    stalled_same_answers: float = Field(default=80.0, ge=0, le=100)  # % of val answers equal to base ...
    stalled_loss_drop: float = Field(default=2.0, ge=0, le=100)  # ... and eval loss down < this %: "barely moved"
    kept: KeptParams = KeptParams()

    @field_validator("max_examples")
    @classmethod
    def _positive_max_examples(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise ValueError("a count >= 1, auto (a capped subset on a CPU, all on a GPU), or null (all)")
        return v

    def examples_cap(self, cuda: bool) -> int | None:
        """max_examples as a count (None = all): auto = CPU_MAX_EXAMPLES on a CPU, all on a GPU."""
        if self.max_examples == "auto":
            return None if cuda else CPU_MAX_EXAMPLES
        return self.max_examples


class RehearseParams(Section):
    """The base model's own answers to general prompts, mixed into training so it stays the assistant it was."""

    enabled: bool = True
    prompts: str = Field(default="data/prompts/rehearsal.jsonl", min_length=1)  # JSONL, {"prompt": ...} a line
    num_examples: int | None = Field(default=None, ge=1)  # answer the first N prompts; null = all
    share: float = 0.5  # of the training examples (so of each step, on average)
    max_repeats: int = Field(default=2, ge=1)  # times one answer may be drawn an epoch; past it the share comes down
    max_new_tokens: int = Field(default=128, ge=1)  # answers cut here end at their last whole sentence, or go
    batch_size: int = Field(default=16, ge=1)

    @field_validator("share", mode="before")
    @classmethod
    def _share(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(
                "the share of training examples that are rehearsal is a number between 0 and 1 (exclusive), "
                "e.g. 0.3; to train without rehearsal set rehearse.enabled: false"
            )
        return value


# A pairs table's fields (llmft.data.pairs maps columns onto them; its ALIASES hold the names it tries).
PAIR_FIELDS = ("prompt", "input", "system", "history", "messages", "chosen", "rejected", "answer", "label")


class PreferParams(Section):
    """Preference tuning on the SFT adapter with LLaMA-Factory's stage dpo (dpo, orpo, simpo) or kto."""

    enabled: bool = False  # true: the stage trains on the pairs; false: models/prefer is the SFT adapter, as is
    method: Literal["dpo", "orpo", "simpo", "kto"] = "dpo"  # dpo/kto compare with the SFT model (a reference forward
    # per sequence, ~1.3x a step); orpo and simpo need no reference; kto takes unpaired good/bad answers
    beta: float = Field(default=0.1, gt=0)  # dpo/kto: higher = stay closer to the SFT model; orpo: weight of the
    # odds-ratio term; simpo: reward scale (its paper uses 2-2.5)
    simpo_gamma: float = Field(default=0.5, ge=0)  # simpo only: the reward margin the chosen answer must win by
    ftx: float = Field(default=0.0, ge=0)  # weight of an SFT loss on the chosen answers (LLaMA-Factory's pref_ftx):
    # > 0 keeps chosen answers likely where DPO would lower both sides
    learning_rate: float = Field(default=5.0e-4, gt=0)  # LLaMA-Factory's llama3_lora_dpo.yaml uses 5e-6 (8B); a
    # CPU demo has a dozen steps for a LoRA that starts at zero: 5e-5 moved nothing there (docs/preference.md)
    num_train_epochs: float = Field(default=2.0, gt=0)
    per_device_train_batch_size: int = Field(default=2, ge=1)  # pairs per step: each is two sequences (kto: one)
    gradient_accumulation_steps: int = Field(default=2, ge=1)
    max_steps: int | None = Field(default=None, ge=1)  # stop here; null = num_train_epochs
    cutoff_len: int = Field(default=512, ge=8)  # prompt + the longer answer, in tokens; LLaMA-Factory cuts the prompt
    save_steps: int = Field(default=10, ge=1)  # checkpoint (and in-training eval) every N steps: a kill resumes here
    cpu_token_budget: int | None = Field(default=30000, ge=1)  # CPU only: cut the run at this many tokens (reference
    # forwards counted at a third); null = none
    source: str = Field(default="own", min_length=1)  # own = pairs from the demo's own mistakes (llmft.prefer_pairs);
    # or a path to your pairs table (prompt, chosen, rejected; kto: prompt, answer, label)
    identity_per_leak: float | None = Field(default=1.0, ge=0)  # own: at most this many identity pairs per leak
    # pair (a seeded sample); null = all. 72 identity against 17 leak pairs raised the demo's leak (docs/preference.md)
    columns: dict[Literal[PAIR_FIELDS], str] = {}  # your table's column for a field, e.g. {prompt: 问题, chosen: 好}
    max_chars: int | None = Field(default=None, ge=1)  # drop pairs whose prompt + longer answer is longer; null = all
    val_size: SplitSize = 0.1  # held-out pairs (a ratio, or a count): the eval's rewards/accuracies are measured here
    seed: int = 42

    @field_validator("val_size", mode="before")
    @classmethod
    def _val(cls, value: SplitSize) -> SplitSize:
        return _check_split("val_size", value, allow_zero=False)


class ExportParams(Section):
    max_shard_size: str = "2GB"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    check_prompts: list[str] = Field(default=["Hello! Who are you?", "解释成语「画蛇添足」的意思。"], min_length=1)
    check_atol: float = Field(default=1e-4, gt=0, le=1)
    check_dtype: Literal["float64", "float32"] = "float64"
    check_new_tokens: int = Field(default=16, ge=1, le=512)

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        if not re.fullmatch(r"\d+(\.\d+)?(KB|MB|GB)", value):
            raise ValueError(f"use a size like 500MB or 2GB; got {value!r}")
        return value


GgufType = Literal["f32", "f16", "bf16", "q8_0"]  # what llama.cpp's Python converter writes (k-quants need C++)


class GgufParams(Section):
    types: list[GgufType] = Field(default=["f16", "q8_0"], min_length=1)
    f16_atol: float = Field(default=0.1, gt=0)
    q8_0_atol: float = Field(default=3.0, gt=0)
    check_new_tokens: int = Field(default=16, ge=1, le=512)
    ollama_type: GgufType = "q8_0"

    @model_validator(mode="after")
    def _ollama_file_is_written(self) -> GgufParams:
        if len(set(self.types)) != len(self.types):
            raise ValueError(f"types lists a type twice: {self.types}")
        if self.ollama_type not in self.types:
            raise ValueError(f"ollama_type {self.ollama_type!r} names no file: add it to types {self.types}")
        return self


class BenchmarkParams(Section):
    """Standard benchmarks (lm-eval tasks) on the base and the tuned model, with the same settings for both."""

    enabled: bool = True  # false: the stage writes {"enabled": false} and loads nothing
    tasks: list[str] = Field(default=["hellaswag_subset"], min_length=1)  # lm-eval task names; local: no network
    num_fewshot: int = Field(default=0, ge=0)  # 0 = zero-shot; mmlu_subset has 5 examples per subject
    limit: int | None = Field(default=None, ge=1)  # the first N questions per task; null = all (hellaswag_subset: 400)
    batch_size: int = Field(default=8, ge=1)  # per forward pass; at 8 on SmolLM2-135M peak RSS 3 GB 0-shot, 4.3 5-shot
    backend: Literal["hf", "vllm"] = "hf"  # vllm: CUDA only, one engine, the adapter applied per request
    include_path: str = Field(default="data/benchmarks/tasks", min_length=1)  # local task YAMLs, relative to cwd


class ReportParams(Section):
    num_samples: int = Field(default=10, ge=0)


class Params(Section):
    prepare: PrepareParams
    model: ModelParams = ModelParams()
    rehearse: RehearseParams = RehearseParams()
    train: TrainParams = TrainParams()
    prefer: PreferParams = PreferParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    gguf: GgufParams = GgufParams()
    benchmark: BenchmarkParams = BenchmarkParams()
    report: ReportParams = ReportParams()


_UNION_TAGS = ("int", "float", "str", "literal[4,8]", "none")
# Sections were renamed after their stages; an old params.yaml gets one line naming the change, not three
# "unknown key" errors and a missing section.
RENAMED_SECTIONS = {"data": "prepare", "rehearsal": "rehearse", "eval": "evaluate"}


def _model_at(loc: tuple) -> Any:
    """The pydantic model class that holds the last key of `loc` (list items and dict values unwrapped)."""
    parent: Any = Params
    for part in loc:
        if isinstance(part, int):
            continue
        field = (
            parent.model_fields.get(str(part)) if isinstance(parent, type) and issubclass(parent, BaseModel) else None
        )
        parent = field.annotation if field else None
        while get_args(parent) and not (isinstance(parent, type) and issubclass(parent, BaseModel)):
            parent = next((a for a in get_args(parent) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return parent


def _describe(err: dict, source: str) -> str:
    key = ".".join(f"[{p + 1}]" if isinstance(p, int) else str(p) for p in err["loc"]).replace(".[", "[")
    if err["type"] == "extra_forbidden":
        parent = _model_at(err["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else "?"
        return f"{source}: unknown key {key!r}; allowed keys here: {allowed}"
    if err["type"] == "missing":
        return f"{source}: {key} is required"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{source}: {key} = {err['input']!r} is not allowed: {msg}"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate an already-loaded params mapping; raise UserError naming every bad key."""
    if not isinstance(raw, dict):
        raise UserError(
            f"{source}: expected a mapping of sections (prepare, model, train, ...), got {type(raw).__name__}"
        )
    renamed = [f"`{old}:` is now `{new}:`" for old, new in RENAMED_SECTIONS.items() if old in raw]
    if renamed:
        raise UserError(f"{source}: sections are named after their stage: {', '.join(renamed)}; rename them")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        # Union types report one error per member; keep the first per key.
        seen: dict[tuple, str] = {}
        for err in exc.errors():
            err["loc"] = tuple(p for p in err["loc"] if p not in _UNION_TAGS and p != "[key]")
            seen.setdefault(err["loc"], _describe(err, source))
        raise UserError("; ".join(seen.values())) from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] = ()) -> Params:
    """params.yaml, validated; `overrides` are `section.key=value` (YAML values), as `dvc exp run -S` takes them."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found (run from the repo root, or pass --params)") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    for item in overrides:
        key, sep, value = item.partition("=")
        *parents, last = key.split(".")
        if not sep or not parents or not isinstance(raw, dict):
            raise UserError(f"{item!r}: an override is section.key=value, e.g. train.nproc=2")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return parse_params(raw, str(path) + (f" with {' '.join(overrides)}" if overrides else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--file", default="params.yaml")
    args = parser.parse_args(argv)
    load_params(args.file)
    print(f"{args.file}: OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
