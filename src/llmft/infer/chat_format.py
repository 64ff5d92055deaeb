"""Prompts formatted exactly as LLaMA-Factory formats them in training: the tokenizer plus its template.

fmt = load_chat_format("models/base")                 # tokenizer + LLaMA-Factory template
prompt_ids, _ = fmt.encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmft.common import UserError
from llmft.infer.text import complete_decode
from llmft.model import read_model_info


@dataclass
class ChatFormat:
    """The tokenizer plus the LLaMA-Factory template the adapter was trained with."""

    tokenizer: Any
    template: Any  # llamafactory.data.template.Template
    data_args: Any  # llamafactory.hparams.DataArguments (template, cutoff_len)
    path: str  # where the base weights load from
    trust_remote_code: bool = False

    @property
    def stop_ids(self) -> list[int]:
        return sorted(self.template.get_stop_token_ids(self.tokenizer))

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode(self, messages: list[dict], system: str | None = None, tools: str | None = None):
        """(prompt_ids, answer_ids) exactly as LLaMA-Factory's do_predict builds them.

        `messages` alternate user/assistant and end with the assistant turn to predict (its content may be "").
        Long examples are cut to `cutoff_len` by LLaMA-Factory's own rule (infer_seqlen).
        """
        from llamafactory.data.processor.processor_utils import infer_seqlen

        prompt_ids, answer_ids = self.template.encode_oneturn(self.tokenizer, messages, system or None, tools or None)
        if self.template.efficient_eos:
            answer_ids = answer_ids + [self.tokenizer.eos_token_id]
        keep_prompt, keep_answer = infer_seqlen(len(prompt_ids), len(answer_ids), self.data_args.cutoff_len)
        return prompt_ids[:keep_prompt], answer_ids[:keep_answer]


def load_chat_format(base_dir: str | Path, cutoff_len: int = 2048) -> ChatFormat:
    """Tokenizer + LLaMA-Factory template of models/base; UserError when the tokenizer has no chat template."""
    from transformers import AutoTokenizer

    info = read_model_info(base_dir)
    trust = bool(info.get("params", {}).get("trust_remote_code", False))
    try:
        tokenizer = AutoTokenizer.from_pretrained(info["path"], trust_remote_code=trust)
    except (OSError, ValueError) as err:
        raise UserError(
            f"{base_dir}: cannot load the tokenizer from {info['path']}: {str(err).strip().splitlines()[0]}"
        ) from None
    if not tokenizer.chat_template:
        raise UserError(
            f"{info['path']}: the tokenizer has no chat template, so chat prompts are undefined; "
            "use a chat/instruct model or add chat_template to its tokenizer_config.json"
        )
    from llamafactory.data.template import TEMPLATES, get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    if info["template"] not in TEMPLATES:
        raise UserError(
            f"{base_dir}/model_info.json: template {info['template']!r} is not a LLaMA-Factory "
            "template; rerun `dvc repro model` or fix model.template"
        )
    data_args = DataArguments(template=info["template"], cutoff_len=cutoff_len)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    tokenizer.padding_side = "left"
    return ChatFormat(tokenizer, template, data_args, info["path"], trust)


def chat_rows(split: str, items: list[dict], fmt: ChatFormat) -> list[dict]:
    """Single prompts (evaluate.probes, evaluate.kept.prompts) as examples: a chat prompt each, and what a good answer
    contains (`expect`, any of them)."""
    rows = []
    for i, item in enumerate(items):
        messages = [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": ""}]
        rows.append(
            {
                "split": split,
                "index": i,
                "prompt": item["prompt"],
                "label": " | ".join(item["expect"]),
                "expect": item["expect"],
                **({"kind": item["kind"]} if item.get("kind") else {}),
                "prompt_ids": fmt.encode(messages)[0],
            }
        )
    return rows


def decode_answers(fmt: ChatFormat, answers: list[list[int]]) -> tuple[list[str], list[str]]:
    """(clean answers, answers decoded as LLaMA-Factory decodes its predictions).

    A clean answer has no stop token, and, when max_new_tokens cut it, no half character at the end.
    """
    tok, stops = fmt.tokenizer, set(fmt.stop_ids)
    clean = [
        tok.decode(a[:-1], skip_special_tokens=True).strip()
        if a and a[-1] in stops
        else complete_decode(tok, a, skip_special_tokens=True).strip()
        for a in answers
    ]
    return clean, tok.batch_decode(answers, skip_special_tokens=True)
