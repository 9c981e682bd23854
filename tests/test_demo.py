"""`decomp demo --quick` end to end on the real assets (MiniLM, Rotten Tomatoes, debates, tweets), and the report."""

import json
import math
import os
import subprocess
import sys

from decomp.app.demo import TASKS


def test_quick_demo_writes_a_complete_report(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "decomp", "demo", "--quick", "-o", str(out)],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "report.html" in result.stdout
    results = json.loads((out / "results.json").read_text())
    methods = [row["method"] for row in results["merging"]["rows"]]
    for expected in ("each fine-tuned model alone", "average", "task arithmetic", "TIES (top 20%, global trim)",
                     "DARE-TIES (keep 30%)", "Fisher (exact)", "Fisher (sampled)", "Fisher (empirical)", "RegMean",
                     "components (top 2 of 8 per model)"):
        assert expected in methods
    for row in results["merging"]["rows"]:
        for task in TASKS:
            assert 0.0 <= row[task.name] <= 1.0
        assert math.isfinite(row["normalised mean"])
    assert all(-0.1 <= row[key] <= 1 for row in results["decomposition"]["rows"]    # AMI is ~0 by chance
               for key in ("AMI fresh/rotten/plot", "AMI review/plot"))
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and "<table>" in page and "Fisher (exact)" in page
    assert (out / "results.md").read_text().startswith("# decomp demo (quick)")
    # the second run reuses the cached fine-tunes, and `decomp report` re-renders the page
    models = sorted(p.name for p in (out / "models").iterdir())
    assert len(models) == 3 and not any(name.endswith(".partial") for name in models)
    again = subprocess.run([sys.executable, "-m", "decomp", "report", str(out)], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and (out / "report.html").read_text() == page
