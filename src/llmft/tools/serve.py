"""OpenAI-compatible chat API for the fine-tuned model: LLaMA-Factory's own API app, loopback only.

    make serve                                   # PORT=8000; models/merged, else models/base + models/prefer
    python -m llmft.tools.serve --host 127.0.0.1 --port 8000 [--model models/merged] [--adapter DIR] [--name merged]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="merged", messages=[{"role": "user", "content": "Hi"}], stream=True)

LLaMA-Factory's app takes any model name and any max_tokens, and reports a bad streaming request only after
the stream has begun. A thin layer in front checks each chat request first and answers 4xx with OpenAI's
error body ({"error": {"message", "type", "param", "code"}}), so clients see the reason and the server goes
on serving. Other hosts than loopback need API_KEY set (clients then send it as their api_key).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from llmft.common import UserError, run_main
from llmft.infer.loading import check_adapter
from llmft.infer.text import StreamCleaner, strip_partial
from llmft.model import read_model_info
from llmft.tools.chat import default_paths

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ROLES = {"system", "user", "assistant", "tool", "function"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def check_request(body, served: str, max_tokens_limit: int) -> tuple[int, str, str | None, str | None] | None:
    """(status, message, param, code) for a chat request LLaMA-Factory would mishandle, or None when it is fine."""
    if not isinstance(body, dict):
        return 400, "the body must be a JSON object", None, None
    if body.get("model") != served:
        return (
            404,
            f"the model {body.get('model')!r} does not exist; this server serves {served!r}",
            "model",
            "model_not_found",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return 400, "messages must be a non-empty list of {role, content} objects", "messages", None
    for i, m in enumerate(messages):
        content = m.get("content")
        if m.get("role") not in ROLES:
            return 400, f"messages[{i}].role must be one of {sorted(ROLES)}", f"messages[{i}].role", None
        if isinstance(content, list) and any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            return 400, f"messages[{i}].content: this model reads text only", f"messages[{i}].content", None
    turns = [m["role"] for m in messages[1:]] if messages[0]["role"] == "system" else [m["role"] for m in messages]
    if len(turns) % 2 == 0 or any(
        r not in (("user", "tool") if i % 2 == 0 else ("assistant", "function")) for i, r in enumerate(turns)
    ):
        return (
            400,
            "messages must alternate user/assistant and end with a user message (system first, optional)",
            "messages",
            None,
        )
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= max_tokens_limit
        ):
            return 400, f"{key} must be an integer from 1 to {max_tokens_limit}; got {value!r}", key, None
    n = body.get("n", 1)
    if not isinstance(n, int) or not 1 <= n <= 8 or (n > 1 and body.get("stream")):
        return 400, f"n must be 1 to 8, and 1 when streaming; got {n!r}", "n", None
    for key, low, high in (("temperature", 0, 2), ("top_p", 0, 1), ("presence_penalty", -2, 2)):
        value = body.get(key)
        if value is not None and (not isinstance(value, (int, float)) or not low <= value <= high):
            return 400, f"{key} must be a number from {low} to {high}; got {value!r}", key, None
    return None


def complete_text_chat_model():
    """LLaMA-Factory's ChatModel whose answers never end in a character cut in half by max_tokens (infer/text.py)."""
    from llamafactory.chat import ChatModel

    class CompleteTextChatModel(ChatModel):
        async def achat(self, *args, **kwargs):
            responses = await super().achat(*args, **kwargs)
            for response in responses:
                if response.finish_reason == "length":
                    response.response_text = strip_partial(response.response_text)
            return responses

        async def astream_chat(self, *args, **kwargs):
            cleaner = StreamCleaner()
            async for piece in super().astream_chat(*args, **kwargs):
                if piece := cleaner.feed(piece):
                    yield piece

    return CompleteTextChatModel


def build_app(chat_model, served: str, max_tokens_limit: int):
    """LLaMA-Factory's FastAPI app with request checks in front and OpenAI-style error bodies."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from llamafactory.api.app import create_app
    from starlette.exceptions import HTTPException

    app = create_app(chat_model)

    def fail(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
        return JSONResponse(error_body(status, message, param, code), status_code=status)

    @app.middleware("http")
    async def check_chat_requests(request, call_next):
        if request.method == "POST" and request.url.path.endswith("/chat/completions"):
            try:
                body = json.loads(await request.body())
            except ValueError:
                return fail(400, "the body is not valid JSON")
            problem = check_request(body, served, max_tokens_limit)
            if problem:
                return fail(*problem)
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # LLaMA-Factory's own 4xx, reshaped
        return fail(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return fail(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where)

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="loopback only, unless API_KEY is set")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", help="model directory; default models/merged, else models/base + --adapter")
    parser.add_argument("--adapter", help="LoRA adapter on top of --model (default models/prefer without a merge)")
    parser.add_argument("--name", help="the model name clients must send; default: the model directory's name")
    parser.add_argument(
        "--max-tokens-limit",
        type=int,
        default=2048,
        help="largest max_tokens accepted (capped by the model's context); bounds a request's time",
    )
    args = parser.parse_args(argv)
    if args.host not in LOOPBACK and not os.environ.get("API_KEY"):
        raise UserError(
            f"--host {args.host} would open the API to the network without a password; set API_KEY "
            "(clients send it as api_key) or keep --host 127.0.0.1 behind an SSH tunnel"
        )
    model_dir, adapter = default_paths(args.model, args.adapter)
    info = read_model_info(model_dir)
    served = args.name or Path(model_dir).name
    os.environ["API_MODEL_NAME"] = served  # what LLaMA-Factory's GET /v1/models lists
    from transformers import AutoConfig

    context = getattr(AutoConfig.from_pretrained(info["path"]), "max_position_embeddings", None) or 2048
    limit = min(args.max_tokens_limit, context)
    chat_model = complete_text_chat_model()(
        {
            "model_name_or_path": info["path"],
            "template": info["template"],
            "adapter_name_or_path": str(check_adapter(adapter)) if adapter else None,
            "finetuning_type": "lora",
            "infer_backend": "huggingface",
            "trust_remote_code": False,
            "max_new_tokens": min(1024, limit),
        }
    )  # when a request names no max_tokens
    import uvicorn

    print(f"serving {served!r} at http://{args.host}:{args.port}/v1 (OpenAI API); Ctrl-C stops", flush=True)
    uvicorn.run(build_app(chat_model, served, limit), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
