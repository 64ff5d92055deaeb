"""Load a script of the repo (a stage in src/, a perf script) as a module by its path, so its main() runs in-process.

    from scripts import load_script
    report = load_script("src/report.py")

Stage scripts are files, not modules of the llmft package (DVC runs them as `python src/<stage>.py`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_script(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
