"""make chat: streamed answers, multi-turn history, /clear and /exit, driven like a person at a terminal."""

from __future__ import annotations

import codecs
import io
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmft.tools import chat

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.pieces: list[str] = []

    def write(self, text: str) -> int:
        self.pieces.append(text)
        return super().write(text)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir, tiny_lora_dir):
    return chat.load(str(tiny_model_dir), str(tiny_lora_dir))


def test_answer_is_written_piece_by_piece_as_it_is_generated(loaded):
    model, fmt = loaded
    ids = chat.fit_context(fmt, model, [{"role": "user", "content": "Tell me a story."}], None, 32)
    out = Recorder()
    answer = chat.reply(model, fmt, ids, SimpleNamespace(max_new_tokens=32, temperature=0.0, top_p=0.9), out)
    assert answer and len(out.pieces) >= 3  # several writes, not one at the end
    assert "".join(out.pieces).strip() == answer


def test_history_carries_over_turns_and_clear_forgets_it(
    loaded,
    tiny_model_dir,
    tiny_lora_dir,
    monkeypatch,
    capsys,
):
    prompts: list[str] = []

    def fake_reply(model, fmt, prompt_ids, args, out=sys.stdout):
        prompts.append(fmt.tokenizer.decode(prompt_ids))
        return f"answer {len(prompts)}"

    monkeypatch.setattr(chat, "load", lambda model_dir, adapter: loaded)
    monkeypatch.setattr(chat, "reply", fake_reply)
    monkeypatch.setattr(
        sys, "stdin", io.StringIO("first question\nsecond question\n/clear\nthird question\n/exit\nnever read\n")
    )
    assert chat.main(["--model", str(tiny_model_dir), "--adapter", str(tiny_lora_dir)]) == 0
    assert len(prompts) == 3
    assert "first question" in prompts[1] and "answer 1" in prompts[1] and "second question" in prompts[1]
    assert "first question" not in prompts[2] and "third question" in prompts[2]
    assert "(history cleared)" in capsys.readouterr().out


def test_default_is_merged_if_exported_else_base_plus_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert chat.default_paths(None, None) == ("models/base", "models/prefer")
    (tmp_path / "models/merged").mkdir(parents=True)
    assert chat.default_paths(None, None) == ("models/merged", None)
    assert chat.default_paths("x", None) == ("x", None)


def read_until(fd: int, pattern: str, timeout: float, chunks: list[str] | None = None) -> str:
    """Read the terminal until `pattern` shows up; fail with what was seen after `timeout` seconds."""
    decode, seen, end = codecs.getincrementaldecoder("utf-8")("replace").decode, "", time.time() + timeout
    while pattern not in ANSI.sub("", seen):
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.time()))
        if not ready:
            raise AssertionError(f"no {pattern!r} within {timeout}s; the terminal showed: {seen!r}")
        try:
            data = decode(os.read(fd, 4096))
        except OSError:  # EIO: the child closed the terminal
            raise AssertionError(f"terminal closed before {pattern!r}; it showed: {seen!r}") from None
        seen += data
        if chunks is not None:
            chunks.append(data)
    return ANSI.sub("", seen)


@pytest.mark.integration
@pytest.mark.slow
def test_terminal_session_question_clear_and_ctrl_d(tiny_model_dir, tiny_lora_dir):
    main_fd, child_fd = os.openpty()
    cmd = [
        sys.executable,
        "-m",
        "llmft.tools.chat",
        "--model",
        str(tiny_model_dir),
        "--adapter",
        str(tiny_lora_dir),
        "--max-new-tokens",
        "24",
        "--temperature",
        "1.0",
        "--seed",
        "0",
    ]
    proc = subprocess.Popen(
        cmd,
        stdin=child_fd,
        stdout=child_fd,
        stderr=child_fd,
        cwd=ROOT,
        close_fds=True,
        env={**os.environ, "TERM": "dumb", "LOG_LEVEL": "WARNING"},
    )
    os.close(child_fd)
    try:
        read_until(main_fd, ">>> ", timeout=180)
        os.write(main_fd, "成语「画蛇添足」是什么意思？\r".encode())
        chunks: list[str] = []
        shown = read_until(main_fd, ">>> ", timeout=60, chunks=chunks)
        answer = shown.split("？", 1)[1].rsplit(">>> ", 1)[0].strip()
        assert answer, f"no answer streamed: {shown!r}"
        os.write(main_fd, b"/clear\r")
        assert "(history cleared)" in read_until(main_fd, ">>> ", timeout=30)
        os.write(main_fd, b"\x04")  # Ctrl-D at an empty prompt
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main_fd)
