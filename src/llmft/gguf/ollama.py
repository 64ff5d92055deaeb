"""The Ollama Modelfile: TEMPLATE, SYSTEM and stop words read from models/merged's chat template."""

from __future__ import annotations

import json
from collections.abc import Callable

# Sentinels for reading the role markers out of a chat template (see `ollama_pieces`).
S, U, A, U2 = "\x01SYS\x01", "\x01USER\x01", "\x01ASSISTANT\x01", "\x01USER2\x01"


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
    return pieces if rebuilds_template(pieces, render) else None


def rebuilds_template(pieces: dict, render: Callable[[list[dict], bool], str]) -> bool:
    """Whether the pieces render two sample chats (one turn; system, two turns) as the chat template does."""
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
            return False
    return True


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


def stop_words(tokenizer, pieces: dict | None, stop_ids: list[int]) -> list[str]:
    """The Modelfile's stop words: the turn-end tokens, then the template's own turn end when it is one token."""
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_ids]
    end = pieces["assistant_suffix"].strip() if pieces else ""
    stops += [end] if end in tokenizer.get_vocab() and end not in stops else []  # the template's own turn end
    return stops
