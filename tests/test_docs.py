"""README.md and docs/*.md: every relative link reaches a file, every #anchor a heading, and the README stays short.

    make docs-check                       # or: python -m pytest tests/test_docs.py

Anchors follow GitHub's rules (github-slugger): the heading's text, lowercased, with punctuation and symbols dropped
(letters of any script, digits, `_`, `-` and spaces stay), spaces turned into hyphens; a repeated slug gets -1, -2.
Only ATX headings (`## Title`) are read: the docs use no others. Links inside code spans and fenced code are not links.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 320

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
CODE_SPAN = re.compile(r"(`+)(?:.+?)\1")
# [text](target "title") and ![alt](target); the text may hold one level of brackets ([`x`](y), [a [b]](c)).
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_ANCHOR = re.compile(r"<a\s[^>]*(?:name|id)=[\"']([^\"']+)[\"']", re.I)
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)


def slug(text: str) -> str:
    """GitHub's anchor for a heading's rendered text (before the -1, -2 of repeats)."""
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML renders as nothing in the anchor
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link keeps its text
    text = text.replace("`", "").replace("*", "")  # code and emphasis marks are not text
    keep = []
    for ch in text.lower():
        if ch in "-_ " or unicodedata.category(ch)[0] in "LNM":
            keep.append(ch)
    return "".join(keep).replace(" ", "-")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, code spans blanked (so `[a](b)` in code is not a link)."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        m = FENCE.match(line)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = None
            continue
        if m:
            fence = m.group(1)
            continue
        out.append((number, CODE_SPAN.sub(lambda s: " " * len(s.group(0)), line)))
    return out


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes for this page: one per heading, numbered on repeats, plus HTML name/id."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        if base in seen:
            seen[base] += 1
            anchor = f"{base}-{seen[base]}"
        else:
            seen[base] = 0
            anchor = base
        found.add(anchor)
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image on the page, external ones included."""
    out = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        out += [(number, t) for t in INLINE_LINK.findall(line)]
        ref = REFERENCE_DEF.match(line)
        if ref:
            out.append((number, ref.group(1)))
    return out


def broken_links(path: Path) -> list[str]:
    """One line per relative link on the page whose file or #anchor does not exist."""
    problems = []
    cache: dict[Path, set[str]] = {}
    for number, target in links(path):
        if not target or EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.relative_to(path.parent.parent if path.parent.name == 'docs' else path.parent)}:{number}"
        if not dest.exists():
            problems.append(f"{where}: {target}: no such file")
            continue
        if anchor and dest.suffix == ".md":
            if dest not in cache:
                cache[dest] = anchors(dest)
            if unquote(anchor) not in cache[dest]:
                problems.append(f"{where}: {target}: no heading with anchor #{anchor} in {dest.name}")
    return problems


@pytest.mark.parametrize(
    "heading, expected",
    [
        ("Run it in llama.cpp / Ollama", "run-it-in-llamacpp--ollama"),
        ("Learn the new, keep the old", "learn-the-new-keep-the-old"),
        ("Train on a rented GPU (SkyPilot)", "train-on-a-rented-gpu-skypilot"),
        ("GPU set-up", "gpu-set-up"),
        ("`make chat`: talk to it", "make-chat-talk-to-it"),
        ("**Bold** and [a link](x.md)", "bold-and-a-link"),
        ("使用你自己的数据（CSV）", "使用你自己的数据csv"),
        ("snake_case stays", "snake_case-stays"),
    ],
)
def test_slug_follows_githubs_rules(heading, expected):
    assert slug(heading) == expected


def test_repeated_headings_are_numbered_and_code_is_not_a_heading(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Notes\n\n## Setup\n\n```bash\n# not a heading\n```\n\n## Setup\n\n### Setup\n")
    assert anchors(page) == {"notes", "setup", "setup-1", "setup-2"}


def test_a_broken_file_or_anchor_is_reported_and_code_is_skipped(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\n\n## Real heading\n")
    page = docs / "b.md"
    page.write_text(
        "[ok](a.md#real-heading) [self](#b) [web](https://example.com/x#y)\n"
        "[gone](missing.md) [bad anchor](a.md#nope) `[in code](nowhere.md)`\n"
        "```\n[in a fence](nowhere.md)\n```\n# B\n"
    )
    problems = broken_links(page)
    assert len(problems) == 2, problems
    assert "missing.md: no such file" in problems[0]
    assert "#nope" in problems[1]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_and_anchor_resolves(page):
    problems = broken_links(page)
    assert not problems, "broken links (fix the path or the #anchor):\n" + "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme():
    targets = {t.partition("#")[0] for _, t in links(README)}
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in targets]
    assert not missing, f"README.md links to no docs/{missing}: add them to its Documentation table"


def test_readme_is_short_and_has_a_table_of_contents_with_troubleshooting():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines, the limit is {MAX_README_LINES}: move a deep dive into docs/ and link it"
    )
    heads = [i for i, line in enumerate(lines) if HEADING.match(line)]
    toc = [i for i in heads if slug(HEADING.match(lines[i]).group(2)) in ("contents", "table-of-contents")]
    assert toc, "README.md needs a '## Contents' section near the top"
    start = toc[0]
    end = next((i for i in heads if i > start), len(lines))
    block = "\n".join(lines[start:end])
    assert "docs/troubleshooting.md" in block, "README.md's table of contents must link to docs/troubleshooting.md"
    assert start < 40, "README.md's table of contents belongs near the top"


def test_readme_lists_every_make_target():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = re.findall(r"^([a-z-]+):.*## ", makefile, flags=re.M)
    text = README.read_text(encoding="utf-8")
    missing = [t for t in targets if f"`make {t}`" not in text and f"`make {t} " not in text]
    assert not missing, f"README.md's Make targets table lacks: {', '.join(f'make {t}' for t in missing)}"
