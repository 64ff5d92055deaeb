"""dvc.yaml against the tree: each stage's name runs through its pieces, and its deps are exactly the code it runs.

A stage whose deps miss a module it imports is not rerun when that module changes (stale outputs that look
current); a dep it never imports reruns it for nothing. Both are read from the code, not kept by hand.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from scripts import ROOT

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
LIBRARY = ROOT / "src" / "llmft"

# Where a stage's pieces still go by another name, and why. The naming test fails when one is renamed and left
# here, so this list only shrinks.
NAMED_OTHERWISE = {
    # src/gguf.py would shadow the gguf package (transformers' GGUF reader, used by the model stage) in every stage:
    # a script's own folder comes first on sys.path.
    ("gguf", "script"): "src/export_gguf.py",
}


def test_every_stage_has_one_name_for_script_module_params_target_and_test():
    """Stage X: src/X.py, the library's llmft/X.py (or llmft/**/X.py, llmft/X/), params.yaml's `X:`, `make X`
    and tests/test_X.py, apart from NAMED_OTHERWISE."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    found = {}
    for name, stage in STAGES.items():
        found[name, "script"] = f"src/{name}.py" in stage["cmd"] and (ROOT / "src" / f"{name}.py").exists()
        found[name, "module"] = (LIBRARY / name).is_dir() or any(LIBRARY.rglob(f"{name}.py"))
        found[name, "params"] = name in params
        found[name, "target"] = re.search(rf"^{name}:", makefile, re.M) is not None
        found[name, "test"] = (ROOT / "tests" / f"test_{name}.py").exists()
    assert len(STAGES) == 10
    assert {piece for piece, ok in found.items() if not ok} == set(NAMED_OTHERWISE)
    for (name, _), other in NAMED_OTHERWISE.items():
        assert other in STAGES[name]["cmd"] or other in params, (name, other)


def module_file(name: str) -> Path | None:
    """src/llmft/a/b.py or src/llmft/a/b/__init__.py for llmft.a.b; None outside llmft or for a name in a module."""
    parts = name.split(".")
    if parts[0] != "llmft":
        return None
    base = ROOT / "src" / Path(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported(path: Path) -> set[Path]:
    """The llmft module files `path` imports, lazy imports inside functions included: they run all the same."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        found |= {f for f in map(module_file, names) if f}
    return found


def code_of(stage: dict) -> set[Path]:
    """Every llmft module the stage runs: its script's imports, transitively, and those of the Python files among
    its deps (the report's notebook); empty package __init__ files aside."""
    script = ROOT / next(w for w in stage["cmd"].split() if w.startswith("src/") and w.endswith(".py"))
    todo = [script, *(ROOT / d for d in stage["deps"] if d.endswith(".py") and not d.startswith("src/"))]
    seen: set[Path] = set()
    while todo:
        for module in imported(todo.pop()) - seen:
            seen.add(module)
            todo.append(module)
    return {f for f in seen if f.name != "__init__.py" or f.read_text(encoding="utf-8").strip()}


def covers(dep: Path, module: Path) -> bool:
    return module == dep or dep in module.parents


def test_each_stage_depends_on_exactly_the_library_code_it_runs():
    problems = []
    for name, stage in STAGES.items():
        code = code_of(stage)
        deps = [ROOT / d for d in stage["deps"] if d.startswith("src/llmft")]
        missing = sorted(str(f.relative_to(ROOT)) for f in code if not any(covers(d, f) for d in deps))
        code_dirs = [d for d in deps if d.suffix in ("", ".py")]  # data files (model_card.md) are read, not imported
        unused = [str(d.relative_to(ROOT)) for d in code_dirs if not any(covers(d, f) for f in code)]
        problems += [f"{name}: deps miss {f}" for f in missing] + [f"{name}: never imports {d}" for d in unused]
    assert not problems, "\n".join(problems)
