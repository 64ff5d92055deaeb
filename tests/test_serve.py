"""make serve: the official openai client talks to it; bad requests get 4xx JSON errors and the server goes on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmft.common import run_main
from llmft.tools import serve

ROOT = Path(__file__).resolve().parent.parent
USER = [{"role": "user", "content": "成语「画蛇添足」是什么意思？"}]


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "tiny", "messages": USER}, None, None),
        (
            {
                "model": "tiny",
                "messages": [{"role": "system", "content": "Be brief."}, *USER],
                "max_tokens": 8,
                "stream": True,
                "temperature": 0,
            },
            None,
            None,
        ),
        ({"model": "tiny", "messages": []}, 400, "messages"),
        ({"model": "gpt-4o", "messages": USER}, 404, "model"),
        ({"model": "tiny", "messages": USER, "max_tokens": 10**9}, 400, "max_tokens"),
        ({"model": "tiny", "messages": USER, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny", "messages": USER * 2}, 400, "messages"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
        ({"model": "tiny", "messages": USER, "n": 2, "stream": True}, 400, "n"),
        ({"model": "tiny", "messages": USER, "temperature": -1}, 400, "temperature"),
        ([1, 2], 400, None),
    ],
)
def test_requests_are_checked_before_they_reach_llamafactory(body, status, param):
    problem = serve.check_request(body, "tiny", max_tokens_limit=2048)
    assert (problem and (problem[0], problem[2])) == ((status, param) if status else None)


def test_non_loopback_host_needs_an_api_key(monkeypatch, capsys):
    monkeypatch.delenv("API_KEY", raising=False)
    assert run_main(serve.main, ["--host", "0.0.0.0", "--model", "nowhere"]) == 2
    assert "API_KEY" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, port: int, log: Path, timeout: float = 240) -> None:
    import httpx

    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"server not up after {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.mark.integration
@pytest.mark.slow
def test_openai_client_chats_streams_and_survives_bad_requests(tiny_model_dir, tiny_lora_dir, tmp_path):
    import httpx
    import openai

    port, log = free_port(), tmp_path / "serve.log"
    cmd = [
        sys.executable,
        "-m",
        "llmft.tools.serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        str(tiny_model_dir),
        "--adapter",
        str(tiny_lora_dir),
        "--name",
        "tiny",
        "--max-tokens-limit",
        "64",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "API_VERBOSE": "0"}
        )
    try:
        wait_until_up(proc, port, log)
        assert f"Uvicorn running on http://127.0.0.1:{port}" in log.read_text()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["tiny"]

        done = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=0)
        assert isinstance(done.choices[0].message.content, str) and done.usage.completion_tokens >= 1

        chunks = list(
            client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=0, stream=True)
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert len(chunks) >= 3 and chunks[-1].choices[0].finish_reason == "stop"
        assert text == done.choices[0].message.content  # greedy: streamed and whole answers agree

        for kwargs, error, words in [
            ({"messages": []}, openai.BadRequestError, "non-empty"),
            ({"messages": [], "stream": True}, openai.BadRequestError, "non-empty"),
            ({"messages": USER, "model": "gpt-4o"}, openai.NotFoundError, "does not exist"),
            ({"messages": USER, "max_tokens": 10**9}, openai.BadRequestError, "max_tokens"),
            ({"messages": USER, "max_tokens": 10**9, "stream": True}, openai.BadRequestError, "max_tokens"),
        ]:
            with pytest.raises(error) as caught:
                client.chat.completions.create(**{"model": "tiny", **kwargs})
            assert words in caught.value.body["message"] and caught.value.body["type"] == "invalid_request_error"

        raw = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            content=b"{oops",
            headers={"content-type": "application/json"},
        )
        assert raw.status_code == 400 and raw.json()["error"]["message"] == "the body is not valid JSON"

        capped = client.chat.completions.create(model="tiny", messages=USER, temperature=0)  # no max_tokens
        assert 1 <= capped.usage.completion_tokens <= 64  # the server's --max-tokens-limit
        again = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=0)
        assert again.choices[0].message.content == done.choices[0].message.content  # still serving, same answer
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
