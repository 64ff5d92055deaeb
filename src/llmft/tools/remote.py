"""`make push` / `make pull`: dvc push/pull that fail loudly on a corrupted or missing cache object.

    python -m llmft.tools.remote push [dvc push args...]     # e.g. -r s3
    python -m llmft.tools.remote pull [dvc pull args...]

DVC re-hashes cache objects before it sends them and skips one whose content no longer matches
its hash, but it only prints a warning and exits 0. Here that warning is an error: a teammate
must never pull an incomplete version.
"""

from __future__ import annotations

import os
import re
import sys

from llmft.common import UserError, run_main
from llmft.env import run_dvc

MISSING = re.compile(r"Missing cache files:\s*(.*)", re.S)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("push", "pull"):
        raise UserError("usage: python -m llmft.tools.remote push|pull [dvc args...]")
    proc = run_dvc(*argv, cwd=os.getcwd())
    output = proc.stdout + proc.stderr
    sys.stdout.write(output)
    found = MISSING.search(output)
    if found:
        hashes = ", ".join(re.findall(r"md5: (\w+)", found.group(1))) or found.group(1).strip()
        raise UserError(
            f"dvc {argv[0]}: cache objects corrupted or missing ({hashes}); nothing incomplete should "
            f"be shared: rerun the stage that makes them (dvc repro -f <stage>) or pull them from a good remote"
        )
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(run_main(main))
