"""{{key}} placeholders, filled from prepare.variables: in the user's tables (prepare) and in what a probe expects
(evaluate: the name the data gave the model)."""

from __future__ import annotations

import re

PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def fill(text: str, variables: dict[str, str]) -> str:
    """{{key}} -> its value from `variables`; a key without one stays as written."""
    return PLACEHOLDER.sub(lambda m: variables.get(m[1], m[0]), text)
