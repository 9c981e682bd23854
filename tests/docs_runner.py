"""Runs the code of one documentation page, block by block in document order, in the current directory:

    python tests/docs_runner.py docs/tutorials/merge.md

```python blocks share one namespace (as in a notebook), ```bash blocks run with bash -euo pipefail, and a block
with title="NAME" (```yaml title="recipe.yaml") is written to the file NAME. Blocks of other languages are not
run: ```text for shown output, ```py for Python that needs what the test machine lacks (GPUs, a cluster).
Exits non-zero at the first failing block, naming it."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

FENCE = re.compile(r'^```(\w+)([^\n]*)\n(.*?)^```\s*$', re.S | re.M)


def blocks(markdown: str) -> list[tuple[str, str, str, int]]:
    """(language, attributes, code, line) of every fenced block at the top level of the page."""
    found = []
    for match in FENCE.finditer(markdown):
        line = markdown.count("\n", 0, match.start()) + 1
        found.append((match.group(1), match.group(2), match.group(3), line))
    return found


def run(page: Path) -> None:
    namespace = {"__name__": "__docs__"}
    for language, attributes, code, line in blocks(page.read_text()):
        title = re.search(r'title="([^"]+)"', attributes)
        started = time.perf_counter()
        where = f"{page}:{line}"
        if title:
            Path(title.group(1)).write_text(code)
        elif language == "python":
            exec(compile(code, where, "exec"), namespace)
        elif language == "bash":
            subprocess.run(["bash", "-euo", "pipefail", "-c", code], check=True)
        else:
            continue
        print(f"--- {where} ({language}) ok in {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    run(Path(sys.argv[1]).resolve())
