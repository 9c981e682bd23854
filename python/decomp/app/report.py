"""The demo's report: results.md (Markdown tables) and a self-contained report.html (the same content as simple
HTML, figures embedded as data URIs), rendered from results.json alone, so `decomp report` can redo them."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from ..gradients.writing import write_text

FIGURE_FILES = {"spectrum": "spectrum.png", "gradient clusters": "clusters.png",
                "activation clusters": "activation_clusters.png", "ICA components": "ica.png", "merging": "merging.png"}
SECTION_FIGURES = {"Decomposition": ("spectrum", "gradient clusters", "activation clusters", "ICA components"),
                   "Merging": ("merging",)}
MERGING_COLUMNS = [("method", "label"), "chosen"]   # (header, key): the report shows the display label
DECOMPOSITION_COLUMNS = ["analysis", "AMI fresh/rotten/plot", "AMI review/plot", "top-30 purity"]
STAGE_COLUMNS = ["stage", "seconds", "peak memory (MiB)"]


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.2f}" for k, v in value.items())
    return "" if value is None else str(value)


def table(rows: list, columns: list) -> list:
    """Markdown table lines; a column is a key, or (header, key)."""
    columns = [c if isinstance(c, tuple) else (c, c) for c in columns]
    lines = ["| " + " | ".join(header for header, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(key, "")) for _, key in columns) + " |" for row in rows]
    return lines


def stage_rows(results: dict) -> list:
    """One row per stage: its seconds and, where measured, its peak resident memory."""
    peaks = results.get("peak_memory_mib") or {}
    return [{"stage": stage, "seconds": f"{seconds:.0f}",
             "peak memory (MiB)": "" if peaks.get(stage) is None else f"{peaks[stage]:.0f}"}
            for stage, seconds in results["timings"].items()]


def render_markdown(results: dict) -> str:
    decomposition, merging = results["decomposition"], results["merging"]
    names = [t["name"] for t in merging["tasks"]]
    lines = [f"# decomp demo{' (quick)' if results['quick'] else ''}", "",
             f"Total {results['total_seconds']:.0f} s. all-MiniLM-L6-v2 fine-tuned on {len(names)} tasks; "
             "the Rotten Tomatoes classifier decomposed; the encoders merged (each task keeps its head).", ""]
    if decomposition is not None:
        lines += _decomposition_markdown(decomposition)
    lines += ["## Merging", ""]
    lines += table(merging["tasks"], ["name", "description", "train", "validation", "test"])
    lines += ["", "Test accuracy; coefficients chosen on validation (mean accuracy over the tasks).", ""]
    lines += table(merging["rows"], [*MERGING_COLUMNS, *names, "normalised mean"])
    lines += ["", "## Timings", ""]
    if results.get("peak_mib") is not None:
        lines += [f"Peak resident memory {results['peak_mib']:.0f} MiB (per stage: the high-water mark of the "
                  "process's resident memory, reset as the stage begins).", ""]
    lines += table(stage_rows(results), STAGE_COLUMNS) + [""]
    return "\n".join(lines)


def _decomposition_markdown(decomposition: dict) -> list:
    lines = ["## Decomposition", "",
             f"{decomposition['examples']} snippets (fresh, rotten, plot summaries), gradients of log p(predicted) of "
             f"every parameter sketched to {decomposition['features']} features: "
             f"{decomposition['components for 50%']} components hold 50% of the variance, "
             f"{decomposition['components for 90%']} hold 90%, effective rank {decomposition['effective rank']:.1f}.",
             ""]
    lines += table(decomposition["rows"], DECOMPOSITION_COLUMNS)
    lines += ["", "Top examples of the ICA components:", "", decomposition["top examples"]]
    return lines


def _figure_html(name: str, path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(name)}</figcaption></figure>")


def _line_html(line: str):
    """(html, section) for a non-table line; section is the name of a `## ` heading."""
    if line.startswith("# "):
        return f"<h1>{html.escape(line[2:])}</h1>", None
    if line.startswith("## "):
        return f"<h2>{html.escape(line[3:])}</h2>", line[3:]
    return (f"<p>{html.escape(line)}</p>" if line.strip() else None), None


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
         "text-align:left}th{background:#f3f3f3}figure{display:inline-block;vertical-align:top;margin:0.5em}"
         "img{max-width:520px;width:100%}figcaption{color:#666;font-size:0.9em}")


def render_html(results: dict, figures: dict) -> str:
    """A self-contained page: the Markdown content as simple HTML, each section's figures (embedded as data URIs)
    after its tables."""
    body, pending, in_table = [], [], False
    for line in render_markdown(results).splitlines() + ["## "]:   # a last heading flushes the last figures
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "td" if in_table else "th"
            body += [] if in_table else ["<table>"]
            in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            continue
        body += ["</table>"] if in_table else []
        in_table = False
        text, section = _line_html(line)
        if section is not None:
            body += [_figure_html(name, figures[name]) for name in pending if name in figures]
            pending = list(SECTION_FIGURES.get(section, ()))
            text = text if section else None
        body += [text] if text else []
    return ("<!doctype html><html><head><meta charset='utf-8'><title>decomp demo</title>"
            f"<style>{STYLE}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def write_report(out_dir, results: dict, figures: dict) -> Path:
    """results.md and report.html in out_dir; returns the page's path."""
    out_dir = Path(out_dir)
    markdown, page = render_markdown(results), render_html(results, figures)   # both rendered before either is written
    write_text(out_dir / "results.md", markdown, what="the demo's tables")
    return write_text(out_dir / "report.html", page, what="the demo's report")


def figures_in(out_dir) -> dict:
    """The figures a demo wrote into out_dir/figures, by name."""
    folder = Path(out_dir) / "figures"
    return {name: folder / file for name, file in FIGURE_FILES.items() if (folder / file).exists()}


def rerender(out_dir) -> Path:
    """report.html and results.md again from out_dir/results.json and out_dir/figures."""
    out_dir = Path(out_dir)
    source = out_dir / "results.json"
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: run `decomp demo -o {out_dir}` first")
    try:
        results = json.loads(source.read_text())
        for row in results["merging"]["rows"]:   # results of an older demo named rows by their label alone
            row.setdefault("label", row.get("method"))
        return write_report(out_dir, results, figures_in(out_dir))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{source} is not a demo's results.json (expected the JSON object `decomp demo` writes): "
                         f"{type(error).__name__}: {error}") from None
