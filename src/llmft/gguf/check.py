"""Each GGUF file reloaded by readers independent of the converter and checked against models/merged.

The readers: transformers (`from_pretrained(gguf_file=...)`) and gguf 0.19.0's GGUFReader.
- metadata: the eos and bos ids and tokens and the chat template are those of models/merged;
- tokenizer: the GGUF's own vocabulary, loaded by transformers, encodes the check prompts into the same ids;
- logits: greedy answers of the GGUF model vs models/merged on export.check_prompts (the model's chat template),
  max |Δ logits| on the same tokens within gguf.f16_atol (f32/f16; greedy answers must be identical) or
  gguf.q8_0_atol (q8_0/bf16; greedy agreement is reported).
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path

from llmft.common import UserError, get_logger
from llmft.infer.probe import agreement, probe
from llmft.params import GgufParams

log = get_logger("gguf")

EXACT = ("f32", "f16")  # types whose greedy answers must match models/merged exactly; bf16/q8_0 round harder


@contextmanager
def one_parse_per_file():
    """Within the block, one gguf.GGUFReader per file, shared. transformers' GGUF loader builds a reader for the
    config, the tokenizer and the weights each (four a file here), and every build walks the 49k-token vocabulary:
    about 5 s apiece on a 2-core CPU, most of the stage's time. The readers only read (numpy memmaps), so sharing one
    changes nothing the check sees; it is still gguf's reader under transformers' loader."""
    import gguf

    build, readers = gguf.GGUFReader, {}

    def shared(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = build(path, mode)
        return readers[key]

    gguf.GGUFReader = shared  # transformers imports it from gguf at each call
    try:
        yield
    finally:
        gguf.GGUFReader = build


def read_metadata(path: Path) -> dict:
    """The GGUF keys llama.cpp and Ollama act on, read with gguf 0.19.0 (not the converter's copy)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def value(key: str):
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    tokens = value("tokenizer.ggml.tokens") or []
    meta = {
        k: value(f"tokenizer.ggml.{k}")
        for k in ("model", "pre", "bos_token_id", "eos_token_id", "padding_token_id", "add_bos_token")
    }
    meta["architecture"] = value("general.architecture")
    meta["chat_template"] = value("tokenizer.chat_template")
    meta["vocab_size"] = len(tokens)
    for k in ("bos", "eos"):
        i = meta[f"{k}_token_id"]
        meta[f"{k}_token"] = tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None
    return meta


def check_metadata(name: str, meta: dict, tokenizer, eos_id: int) -> None:
    """UserError naming the file and key where the GGUF's tokenizer metadata differs from models/merged."""
    want = {"eos_token_id": eos_id, "eos_token": tokenizer.convert_ids_to_tokens(eos_id)}
    if tokenizer.bos_token_id is not None:
        want |= {"bos_token_id": tokenizer.bos_token_id, "bos_token": tokenizer.bos_token}
    for key, expected in want.items():
        if meta.get(key) != expected:
            raise UserError(
                f"{name}: GGUF metadata {key} = {meta.get(key)!r}, models/merged has {expected!r}; "
                "llama.cpp would not stop where the model ends a turn. Check models/merged's tokenizer "
                "files (tokenizer_config.json, generation_config.json), then `dvc repro gguf`"
            )
    if meta.get("chat_template") != tokenizer.chat_template:
        raise UserError(
            f"{name}: GGUF metadata tokenizer.chat_template is not models/merged's chat template; "
            "llama.cpp and Ollama would format chats differently. Check models/merged's chat template"
        )


def chat_texts(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as one user turn in the model's own chat template, ready for the assistant's answer."""
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def encode(tokenizer, texts: list[str]) -> list:
    """Token ids (1 x n tensors) of rendered chat texts; the template already holds every special token."""
    return [tokenizer(t, add_special_tokens=False, return_tensors="pt")["input_ids"] for t in texts]


def compare(name: str, got: list, ref: list, prompt_lens: list[int], atol: float, key: str, exact: bool) -> dict:
    """max |Δ logits| and greedy agreement of `got` with `ref`; UserError past `atol` (or on a greedy mismatch)."""
    check = agreement(got, ref, prompt_lens)
    diff, same = check["max_abs_diff"], check["greedy_same"]
    agree, total = check["greedy_tokens_agree"], check["greedy_tokens"]
    log.info(
        "%s: max |Δ logits| = %.3g (gguf.%s %g), same greedy answers on %d/%d, %d/%d tokens before the first "
        "difference",
        name,
        diff,
        key,
        atol,
        same,
        len(ref),
        agree,
        total,
    )
    if not diff <= atol:
        raise UserError(
            f"{name}: max |Δ logits| vs models/merged = {diff:.3g} > gguf.{key} = {atol:g}; the file "
            "is not the merged model. Nothing was written"
        )
    if exact and same != len(ref):
        raise UserError(
            f"{name}: greedy answers differ from models/merged on {len(ref) - same}/{len(ref)} of "
            f"export.check_prompts (max |Δ logits| = {diff:.3g}, within gguf.{key} = {atol:g}); an f16/f32 file "
            "must answer as the merged model. Nothing was written"
        )
    return {
        "max_abs_diff": diff,
        "atol": atol,
        "greedy_same": same,
        "prompts": len(ref),
        "greedy_tokens_agree": agree,
        "greedy_tokens": total,
    }


def verify(
    path: Path, outtype: str, p: GgufParams, tokenizer, texts: list[str], prompts: list, ref: list, stop_ids: list[int]
) -> dict:
    """Reload one GGUF file with transformers and gguf 0.19.0 and check it against models/merged (`ref`)."""
    with one_parse_per_file():
        return _verify(path, outtype, p, tokenizer, texts, prompts, ref, stop_ids)


def _verify(path, outtype, p, tokenizer, texts, prompts, ref, stop_ids) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = path.name
    meta = read_metadata(path)
    check_metadata(name, meta, tokenizer, stop_ids[0])
    gguf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=name)
    for text, ids in zip(texts, prompts):
        got = gguf_tok(text, add_special_tokens=False)["input_ids"]
        if got != ids[0].tolist():
            raise UserError(
                f"{name}: its tokenizer encodes the chat prompt {text[-40:]!r} into other ids than "
                f"models/merged ({len(got)} vs {ids.shape[1]} tokens; tokenizer.ggml.model = "
                f"{meta['model']}); llama.cpp would see other tokens than the model was trained on"
            )
    del gguf_tok
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=name, dtype=torch.float32).eval()
    exact = outtype in EXACT
    key = "f16_atol" if exact else "q8_0_atol"
    got = probe(model, prompts, p.check_new_tokens, stop_ids, ref, dtype="float")
    del model
    gc.collect()
    check = compare(name, got, ref, [ids.shape[1] for ids in prompts], getattr(p, key), key, exact)
    return {**check, "tokenizer_model": meta["model"], "tokenizer_pre": meta["pre"], "eos_token": meta["eos_token"]}
