"""Chat with the fine-tuned model in the terminal; the answer streams in as it is generated.

    make chat                                          # models/merged if exported, else models/base + models/prefer
    python -m llmft.tools.chat --model models/base --adapter models/prefer
    python -m llmft.tools.chat --model models/merged --temperature 0.7 --max-new-tokens 512

Type a message and press Enter. /clear forgets the conversation, /exit or Ctrl-D quits,
Ctrl-C stops an answer half-way. Turns are formatted with the LLaMA-Factory template named in
the model's model_info.json, exactly as in training.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

from llmft.common import run_main, seed_everything
from llmft.infer.chat_format import load_chat_format
from llmft.infer.loading import load_model, merge_adapter
from llmft.infer.text import StreamCleaner

MERGED, BASE, ADAPTER = "models/merged", "models/base", "models/prefer"
HELP = "/clear forgets the conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer"


def default_paths(model: str | None, adapter: str | None) -> tuple[str, str | None]:
    """The merged model once exported, else the base with the trained adapter on top."""
    if model:
        return model, adapter
    if Path(MERGED).is_dir():
        return MERGED, adapter
    return BASE, adapter or ADAPTER


def load(model_dir: str, adapter: str | None):
    """(model, ChatFormat): bf16/fp16 on a GPU, bf16 on a CPU with a bf16 unit (else fp32); an adapter is merged in
    memory (base-model speed)."""
    fmt = load_chat_format(model_dir, cutoff_len=10**9)  # fit_context trims the history instead
    model = load_model(fmt)
    return (merge_adapter(model, adapter) if adapter else model), fmt


def fit_context(fmt, model, history: list[dict], system: str | None, max_new_tokens: int) -> list[int]:
    """Prompt ids of the conversation; the oldest exchanges are dropped until prompt + answer fit the context."""
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    while True:
        ids = fmt.encode(history + [{"role": "assistant", "content": ""}], system)[0]
        if len(ids) + max_new_tokens <= limit or len(history) <= 1:
            return ids
        del history[:2]
        print("(the oldest exchange was dropped to fit the context)")


def reply(model, fmt, prompt_ids: list[int], args, out=sys.stdout) -> str:
    """Generate the next assistant turn, writing each piece to `out` as soon as it is decoded."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    streamer = TextIteratorStreamer(fmt.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    stop = threading.Event()

    class Stop(StoppingCriteria):  # Ctrl-C: end generate() at the next token
        def __call__(self, input_ids, scores, **kwargs):
            return stop.is_set()

    ids = torch.tensor([prompt_ids], device=model.device)
    sampling = (
        {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
        if args.temperature > 0
        else {"do_sample": False}
    )
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        streamer=streamer,
        eos_token_id=fmt.stop_ids,
        pad_token_id=fmt.pad_id,
        max_new_tokens=args.max_new_tokens,
        stopping_criteria=StoppingCriteriaList([Stop()]),
        **sampling,
    )
    thread = threading.Thread(target=model.generate, kwargs=kwargs, daemon=True)
    thread.start()
    pieces: list[str] = []
    cleaner = StreamCleaner()  # an answer cut by --max-new-tokens must not end in half a character
    try:
        for piece in streamer:
            piece = cleaner.feed(piece)
            out.write(piece)
            out.flush()
            pieces.append(piece)
    except KeyboardInterrupt:
        stop.set()
        out.write(" ... (stopped)")
    finally:
        thread.join()
        out.write("\n")
        out.flush()
    return "".join(pieces).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help=f"model directory; default {MERGED} if it exists, else {BASE} + {ADAPTER}")
    parser.add_argument("--adapter", help="LoRA adapter directory to apply on top of --model")
    parser.add_argument("--system", help="system prompt; default: the template's own")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length cap; longer = slower turns")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (repeatable); 0.7 = livelier")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling, used when temperature > 0")
    parser.add_argument("--seed", type=int, help="fixes the sampled answers (with --temperature > 0)")
    args = parser.parse_args(argv)
    try:
        import readline  # noqa: F401  (arrow keys and history for input())
    except ImportError:
        pass
    os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "WARN")  # a chat screen, not a log
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    model_dir, adapter = default_paths(args.model, args.adapter)
    print(f"loading {model_dir}" + (f" + {adapter}" if adapter else "") + " ...", flush=True)
    model, fmt = load(model_dir, adapter)
    if args.seed is not None:
        seed_everything(args.seed)
    history: list[dict] = []
    print(f"ready. {HELP}.", flush=True)
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            print()
            continue
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/clear":
            history = []
            print("(history cleared)")
            continue
        if line.startswith("/"):
            print(f"unknown command {line}; {HELP}")
            continue
        history.append({"role": "user", "content": line})
        prompt_ids = fit_context(fmt, model, history, args.system, args.max_new_tokens)
        history.append({"role": "assistant", "content": reply(model, fmt, prompt_ids, args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
