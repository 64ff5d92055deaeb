"""Examples of a prepared split, converted and tokenized exactly as LLaMA-Factory does it in training.

    attr = dataset_attr(Path("data/processed"), "val")
    for ex in convert_rows(attr, data_args, rows): ...   # {"_prompt", "_response", "_system", "_tools"} or None

Both the train stage (token lengths for packing) and the evaluate stage (prompts and answers) go through
here, so the two can never format an example differently.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmft.common import UserError, get_logger

log = get_logger("train")


def dataset_attr(data_dir: Path, name: str):
    """LLaMA-Factory's DatasetAttr of split `name`, from data_dir/dataset_info.json; UserError when missing."""
    from llamafactory.data.parser import get_dataset_list

    try:
        return get_dataset_list([name], str(data_dir))[0]
    except ValueError as err:  # no dataset_info.json, or no entry for this split
        raise UserError(f"{data_dir}/dataset_info.json: {err} Rerun `dvc repro prepare`") from None


def convert_rows(attr, data_args, rows: list) -> Iterator[dict[str, Any] | None]:
    """Each row through LLaMA-Factory's Alpaca/ShareGPT converter; None for a row it cannot convert."""
    from llamafactory.data.converter import get_dataset_converter

    convert = get_dataset_converter(attr.formatting, attr, data_args)
    for row in rows:
        try:
            yield convert(collections.defaultdict(lambda: None, row)) if isinstance(row, dict) else None
        except (TypeError, ValueError, KeyError, AttributeError):
            yield None


def example_lengths(
    model_path: str,
    template: str,
    data_dir: Path,
    cutoff_len: int,
    trust_remote_code: bool = False,
    limit: int = 20000,
    name: str = "train",
) -> tuple[int, ...]:
    """Token length of the first `limit` examples of dataset `name` as LLaMA-Factory encodes them (template included,
    not cut to cutoff_len), in dataset order; () when the tokenizer or the data can't be read. Imports LLaMA-Factory."""
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        data_args = DataArguments(template=template, cutoff_len=cutoff_len)
        tmpl = get_template_and_fix_tokenizer(tokenizer, data_args)
        attr = dataset_attr(data_dir, name)
        rows = json.loads((data_dir / attr.dataset_name).read_text(encoding="utf-8"))[:limit]
    except (OSError, ValueError, KeyError, UserError) as err:
        log.warning("train.profile: cannot measure example lengths (%s); no packing", str(err).splitlines()[0][:200])
        return ()
    lengths = []
    for ex in convert_rows(attr, data_args, rows):
        if ex is None:
            continue
        prompt_ids, answer_ids = tmpl.encode_oneturn(
            tokenizer, ex["_prompt"] + ex["_response"], ex["_system"] or None, ex["_tools"] or None
        )
        lengths.append(len(prompt_ids) + len(answer_ids) + int(tmpl.efficient_eos))
    return tuple(lengths)
