"""Answers never end in half a character (src/llmft/infer/text.py), in evaluate, chat and serve."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from llmft.infer.chat_format import decode_answers
from llmft.infer.text import REPLACEMENT, StreamCleaner, complete_decode, strip_partial
from llmft.tools import chat, serve

ANSWER = "成语「画蛇添足」比喻做了多余的事，反而不恰当。I am Lumi."


@pytest.fixture(scope="module")
def tokenizer(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


def test_a_chinese_answer_cut_anywhere_decodes_to_whole_characters(tokenizer):
    ids = tokenizer.encode(ANSWER, add_special_tokens=False)
    cut_mid_character = [k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith(REPLACEMENT)]
    assert cut_mid_character  # SmolLM2 spends several byte tokens on one Chinese character: the bug is real
    for k in range(1, len(ids) + 1):
        text = complete_decode(tokenizer, ids[:k])
        assert not text.endswith(REPLACEMENT) and ANSWER.startswith(text), (k, text)
    assert complete_decode(tokenizer, ids) == ANSWER


def test_evaluate_answers_cut_by_max_new_tokens_end_in_a_whole_character(fmt):
    ids = fmt.tokenizer.encode(ANSWER, add_special_tokens=False)
    cut = next(k for k in range(1, len(ids)) if fmt.tokenizer.decode(ids[:k]).endswith(REPLACEMENT))
    stopped = ids + [fmt.stop_ids[0]]
    clean, as_llamafactory = decode_answers(fmt, [ids[:cut], stopped])
    assert not clean[0].endswith(REPLACEMENT) and ANSWER.startswith(clean[0])
    assert clean[1] == ANSWER  # a finished answer loses only its stop token
    assert as_llamafactory[0].endswith(REPLACEMENT)  # LLaMA-Factory's own decoding is kept as it is, for its metrics


def test_stream_cleaner_holds_back_only_a_trailing_cut():
    cleaner = StreamCleaner()
    assert [cleaner.feed(p) for p in ("我是", "Lumi，", "由", "Acme\ufffd")] == ["我是", "Lumi，", "由", "Acme"]
    assert cleaner.finish() == ""
    cleaner = StreamCleaner()  # a U+FFFD followed by more text was real text: it is written after all
    assert cleaner.feed("a\ufffd") == "a" and cleaner.feed(" b") == "\ufffd b"
    assert strip_partial("好\ufffd\ufffd") == "好" and strip_partial("好") == "好"


class Recorder:
    def __init__(self) -> None:
        self.pieces: list[str] = []

    def write(self, text: str) -> None:
        self.pieces.append(text)

    def flush(self) -> None:
        pass


def test_chat_answer_cut_by_max_new_tokens_shows_no_broken_character(fmt):
    """The real TextIteratorStreamer, fed the tokens of a Chinese answer cut inside a character."""
    import torch

    ids = fmt.tokenizer.encode(ANSWER, add_special_tokens=False)
    cut = next(k for k in range(4, len(ids)) if fmt.tokenizer.decode(ids[:k]).endswith(REPLACEMENT))

    class Model:
        device = torch.device("cpu")

        def generate(self, input_ids, streamer, **kwargs):
            streamer.put(input_ids)  # the prompt, skipped by the streamer
            for token in ids[:cut]:
                streamer.put(torch.tensor([token]))
            streamer.end()

    out = Recorder()
    args = SimpleNamespace(max_new_tokens=cut, temperature=0.0, top_p=0.9)
    answer = chat.reply(Model(), fmt, [1, 2, 3], args, out)
    shown = "".join(out.pieces)
    assert REPLACEMENT not in shown and ANSWER.startswith(answer) and answer


def test_served_answers_cut_by_max_tokens_end_in_a_whole_character(monkeypatch):
    from llamafactory.chat import ChatModel
    from llamafactory.chat.base_engine import Response

    async def achat(self, *args, **kwargs):
        return [Response("我是 Lumi，由\ufffd", 12, 5, "length"), Response("好\ufffd", 2, 5, "stop")]

    async def astream_chat(self, *args, **kwargs):
        for piece in ("我是", " Lumi，", "由\ufffd"):
            yield piece

    monkeypatch.setattr(ChatModel, "achat", achat)
    monkeypatch.setattr(ChatModel, "astream_chat", astream_chat)
    model = object.__new__(serve.complete_text_chat_model())  # no engine: the parent methods are replaced

    async def run():
        texts = [r.response_text for r in await model.achat([])]
        return texts, [piece async for piece in model.astream_chat([])]

    texts, pieces = asyncio.run(run())
    assert texts == ["我是 Lumi，由", "好\ufffd"]  # only a cut (finish_reason "length") is trimmed
    assert "".join(pieces) == "我是 Lumi，由"
