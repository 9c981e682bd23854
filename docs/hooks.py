"""MkDocs hooks: pages generated from the code at build time, and the benchmark figures served from
benchmarks/results/ (where the benchmark scripts write them) without copies in docs/.

Markers replaced in a page's Markdown:

  <!-- decomp-cli-help -->       the CLI reference, from the parser itself (decomp.app.cli.build_parser)
  <!-- decomp-merge-methods -->  the table of merge methods, from the registry (decomp.merge_methods()), so a
                                 method registered in decomp/merging/methods/ appears without editing any page
  <!-- decomp-model-coverage --> benchmarks/results/zoo.md through pymdownx.snippets when that file exists,
                                 else a note saying how it is generated (the build never fails for want of it)
"""

from __future__ import annotations

import argparse
import html
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ZOO = RESULTS / "zoo.md"
CLI_MARKER = "<!-- decomp-cli-help -->"
METHODS_MARKER = "<!-- decomp-merge-methods -->"
COVERAGE_MARKER = "<!-- decomp-model-coverage -->"


def _cli_reference() -> str:
    from decomp.app.cli import build_parser

    parser = build_parser()
    parts = ["```text", parser.format_help().rstrip(), "```"]
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subcommands.choices.items():
        parts += ["", f"## decomp {name}", "", "```text", sub.format_help().rstrip(), "```"]
    return "\n".join(parts)


# --- the merge methods, from the registry ---------------------------------------------------------------------------
# Written as raw HTML: docstrings hold |, *, [ ] and < that Markdown would read as table cells, emphasis, links
# and tags. `code` spans of the docstrings become <code>.

def _text(text: str) -> str:
    """Plain docstring text as HTML: escaped, `code` spans kept as code."""
    parts = re.split(r"``?([^`]+)``?", text)
    return "".join(html.escape(part) if i % 2 == 0 else f"<code>{html.escape(part)}</code>"
                   for i, part in enumerate(parts))


def _paragraphs(doc: str) -> list[str]:
    """The docstring's paragraphs, each joined into one line."""
    import inspect

    cleaned = inspect.cleandoc(doc or "")
    return [" ".join(line.strip() for line in block.splitlines()) for block in re.split(r"\n\s*\n", cleaned)
            if block.strip()]


def _default(value) -> str:
    return html.escape(repr(value) if isinstance(value, str) else str(value))


def _needs(method) -> str:
    needs = [f"<code>{html.escape(n)}</code>" for n in method.needs]
    if not getattr(method, "weighted", True):
        needs.append("no weights λ")
    return ", ".join(needs) or "—"


def _parameter_cell(method) -> str:
    lines = [f"<code>{html.escape(p.name)}={_default(p.default)}</code> ({html.escape(p.expected())})"
             for p in method.parameters]
    return "<br>".join(lines) or "—"


def _method_details(method) -> str:
    """A collapsible block: the formula's whole docstring and every parameter's doc."""
    body = "".join(f"<p>{_text(paragraph)}</p>" for paragraph in _paragraphs(method.doc)[1:])
    if method.parameters:
        items = "".join(f"<li><code>{html.escape(p.name)}</code> = <code>{_default(p.default)}</code>, "
                        f"{html.escape(p.expected())}{': ' + _text(p.doc) if p.doc else ''}</li>"
                        for p in method.parameters)
        body += f"<ul>{items}</ul>"
    summary = f"<code>{html.escape(method.name)}</code>"
    return f'<details class="abstract"><summary>{summary}</summary>{body or "<p>No further parameters.</p>"}' \
           f"</details>"


def merge_methods_table() -> str:
    """Every registered merge method: a table (name, needs, parameters with defaults, formula and paper), the
    meaning of each need, and one collapsible block per method with its whole formula and parameter docs."""
    import decomp
    from decomp.merging.registry import NEED_DOCS

    methods = decomp.merge_methods()
    rows = []
    for method in methods.values():
        summary = _paragraphs(method.doc)[0] if method.doc.strip() else ""
        rows.append(f'<tr><td style="white-space: nowrap"><code>{html.escape(method.name)}</code></td>'
                    f"<td>{_needs(method)}</td>"
                    f"<td>{_parameter_cell(method)}</td><td>{_text(summary)}</td></tr>")
    # no class on the table: the theme styles only tables without one
    table = ('<table id="merge-methods"><thead><tr><th>method</th><th>needs</th>'
             "<th>parameters (defaults)</th><th>formula and paper</th></tr></thead><tbody>"
             + "".join(rows) + "</tbody></table>")
    legend = "".join(f"<li><code>{html.escape(need)}</code>: {_text(text)}</li>" for need, text in NEED_DOCS.items())
    details = "\n".join(_method_details(method) for method in methods.values())
    return "\n\n".join([table, f"<p>What a method needs besides the models:</p><ul>{legend}</ul>", details])


# --- model coverage -------------------------------------------------------------------------------------------------

def model_coverage() -> str:
    if ZOO.is_file():
        first = ZOO.read_text().lstrip().split("\n", 1)[0]
        lines = ":2:" if first.startswith("# ") else ""   # the file's own title would be a second one here
        return f'--8<-- "{ZOO.relative_to(ROOT).as_posix()}{lines}"'
    return ("!!! note \"Not generated yet\"\n    The table is generated by `python -m pytest tests/test_zoo.py`, which "
            "writes `benchmarks/results/zoo.md`; this page includes it when the site is built.")


def on_page_markdown(markdown, page, config, files):
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, _cli_reference())
    if METHODS_MARKER in markdown:
        markdown = markdown.replace(METHODS_MARKER, merge_methods_table())
    if COVERAGE_MARKER in markdown:
        markdown = markdown.replace(COVERAGE_MARKER, model_coverage())
    return markdown


def on_files(files, config):
    for image in sorted(RESULTS.glob("*.png")):
        files.append(File(f"results/{image.name}", src_dir=str(RESULTS.parent), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files
