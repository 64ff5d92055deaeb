"""The report stage's work: run the report notebook with nbclient, convert it to HTML and Markdown.

report.html is one self-contained file (images as base64 PNG, no scripts from a CDN), report.md is for GitHub
and PR comments, its figures in a folder beside it. Inputs are checked first: a missing one names the stage.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from llmft.common import UserError, get_logger

log = get_logger("report")

# Drop the lab template's CDN scripts (require.js, MathJax, mermaid): the report has no widgets or maths,
# and reads offline. The CSS stays inlined. Figures carry the alternative text the notebook gives them.
HTML_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block data_png scoped -%}
<div class="jp-RenderedImage jp-OutputArea-output">
<img src="data:image/png;base64,{{ output.data['image/png'] | escape_html }}"
     alt="{{ output | get_metadata('alt', 'image/png') | escape_html }}">
</div>
{%- endblock data_png -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}
<style type="text/css">
  body { font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans CJK SC", "PingFang SC", "Microsoft YaHei",
         sans-serif; }
  main { max-width: 1180px; margin: 0 auto; padding: 8px 24px 48px; }
  /* prefixed with .jp-RenderedHTMLCommon to win over the lab theme's table and pre rules */
  .jp-RenderedHTMLCommon table.report { border-collapse: collapse; margin: 6px 0 14px; font-size: 13px; }
  .jp-RenderedHTMLCommon table.report th, .jp-RenderedHTMLCommon table.report td {
    border: 1px solid #d0d7de; padding: 4px 8px; }
  .jp-RenderedHTMLCommon table.report .num { text-align: right; font-variant-numeric: tabular-nums; }
  .jp-RenderedHTMLCommon table.report .text { text-align: left; }
  .jp-RenderedHTMLCommon table.report.wrap td { white-space: pre-wrap; vertical-align: top; max-width: 420px; }
  .jp-RenderedHTMLCommon table.report thead { background: #f3f5f7; }
  .jp-RenderedHTMLCommon table.report tbody tr:nth-child(even) { background: #fafbfc; }
  .jp-RenderedHTMLCommon pre.code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
    font-size: 12px; background: #f6f8fa; padding: 8px 12px; border-radius: 4px; column-gap: 32px; }
  .jp-RenderedImage img { max-width: 100%; }
</style>
{%- endblock extra_css -%}
"""
MD_TEMPLATE = """{%- extends 'markdown/index.md.j2' -%}
{%- block data_png -%}
![{{ output | get_metadata('alt', 'image/png') }}]({{ output.metadata.filenames['image/png'] | path2url }})
{%- endblock data_png -%}
"""


def inputs(args: argparse.Namespace) -> dict[str, tuple[Path, str]]:
    """Each input the notebook reads (by its name there) -> (path, how to make it)."""

    def rerun(target: str, stage: str) -> str:
        return f"`make {target}` (dvc repro {stage})"

    return {
        "PREPARE": (args.prepare, rerun("data", "prepare")),
        "TRAIN": (args.train, rerun("train", "train")),
        "EVAL": (args.eval, rerun("eval", "evaluate")),
        "PREDICTIONS": (args.predictions, rerun("eval", "evaluate")),
        "PLOTS": (args.plots, rerun("train", "train")),
        "DATA_DIR": (args.data_dir / "train.json", rerun("data", "prepare")),
        "MODEL_DIR": (args.base / "model_info.json", rerun("model", "model")),
    }


def check_inputs(args: argparse.Namespace) -> None:
    """UserError naming the first missing or unreadable input and the stage that writes it."""
    for path, rerun in inputs(args).values():
        if not path.exists():
            raise UserError(f"{path} is missing: run {rerun} first")
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".jsonl":
                rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
                missing = {"prompt", "label", "base", "tuned"} - set(rows[0] if rows else {})
                if not rows or missing:
                    raise UserError(
                        f"{path} has no predictions with prompt, label, base and tuned "
                        f"(missing: {', '.join(sorted(missing)) or 'rows'}): rerun {rerun}"
                    )
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path} is not valid UTF-8 JSON ({err}): rerun {rerun}") from None
    if not any(args.plots.glob("**/*.tsv")):
        raise UserError(f"{args.plots} has no DVCLive .tsv logs: rerun `make train` (dvc repro train)")
    if args.export.exists():  # optional: the report says when the model was not merged yet
        try:
            json.loads(args.export.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{args.export} is not valid UTF-8 JSON ({err}): rerun `make export`") from None


def execute(notebook: Path, values: dict[str, str], timeout: int):
    """The notebook, run in a fresh kernel from the current directory, with `values` set after `parameters`."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = jupytext.read(notebook)
    at = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), None)
    if at is None:
        raise UserError(f'{notebook}: no cell tagged `parameters` (# %% tags=["parameters"]) to put the paths after')
    source = "# Injected by src/report.py\n" + "".join(f"{k} = {v!r}\n" for k, v in values.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"  # not random: the same inputs give a byte-identical report (clean git diffs)
    nb.metadata["title"] = "Fine-tuning report"
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": "."}},
        extra_arguments=["--IPKernelApp.log_level=ERROR"],
    )  # no "running over TCP" notice
    try:
        client.execute()
    except CellExecutionError as err:
        log.error("%s", err)  # the cell and its traceback, for whoever debugs it
        last = re.sub(r"\x1b\[[0-9;]*m", "", str(err).strip().splitlines()[-1])  # no terminal colours
        raise UserError(
            f"{notebook} failed: {last} (the cell and its traceback are above; open the notebook "
            "in Jupyter to run it cell by cell)"
        ) from None
    for cell in nb.cells:  # warnings go to this stage's log, not into the report
        for out in [o for o in cell.get("outputs", []) if o.get("name") == "stderr"]:
            log.warning("notebook: %s", out["text"].strip())
            cell.outputs.remove(out)
    return nb


def convert(nb, html_out: Path, md_out: Path, figures: Path) -> None:
    """Write the html (images embedded) and the md (images as files in `figures`) without the code cells."""
    import jinja2
    from nbconvert import HTMLExporter, MarkdownExporter
    from traitlets.config import Config

    hide = {"exclude_input": True, "exclude_input_prompt": True, "exclude_output_prompt": True}
    html_exporter = HTMLExporter(
        extra_loaders=[jinja2.DictLoader({"report.html.j2": HTML_TEMPLATE})],
        template_file="report.html.j2",
        embed_images=True,
        **hide,
    )
    body, _ = html_exporter.from_notebook_node(nb)
    html_out.write_text(body, encoding="utf-8")

    # Markdown first: tables keep their Markdown form on GitHub (the HTML form is for report.html).
    config = Config(
        {"NbConvertBase": {"display_data_priority": ["text/markdown", "image/png", "text/html", "text/plain"]}}
    )
    # The MarkdownExporter's ExtractOutputPreprocessor takes the PNGs out into resources["outputs"].
    md_exporter = MarkdownExporter(
        config=config,
        extra_loaders=[jinja2.DictLoader({"report.md.j2": MD_TEMPLATE})],
        template_file="report.md.j2",
        **hide,
    )
    body, resources = md_exporter.from_notebook_node(
        nb, resources={"output_files_dir": figures.name, "unique_key": "figure"}
    )
    figures.mkdir()
    for name, data in sorted(resources.get("outputs", {}).items()):
        (figures / Path(name).name).write_bytes(data)
    md_out.write_text(body.strip() + "\n", encoding="utf-8")
