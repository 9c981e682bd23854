"""`decomp demo --quick` end to end on the real assets (MiniLM, Rotten Tomatoes, debates, tweets), and the report.

The run is the quick demo with fewer examples (--size): every stage, merge and figure of it, in about half the
time (the quick demo's own 8 minutes here were half of the suite); the statistics keep the quick demo's sizes, so
its memory bars hold for the quick demo itself."""

import json
import math
import os
import subprocess
import sys

from decomp.app.demo import QUICK, TASKS


def test_quick_demo_writes_a_complete_report(tmp_path):
    out = tmp_path / "demo"
    smaller = {"train": 160, "validation": 32, "test": 48, "decompose": 120}
    result = subprocess.run([sys.executable, "-m", "decomp", "demo", "--quick", "-o", str(out),
                             *[f"--size={key}={value}" for key, value in smaller.items()]],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "report.html" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] and results["sizes"] == {**QUICK, **smaller}
    assert all(task[split] == smaller[split] for task in results["merging"]["tasks"]
               for split in ("train", "validation", "test"))
    assert results["decomposition"]["examples"] == smaller["decompose"]
    rows = {row["label"]: row for row in results["merging"]["rows"]}
    for label, method in (("each fine-tuned model alone", "fine_tuned"), ("average", "average"),
                          ("task arithmetic", "task_arithmetic"), ("TIES (top 20%, global trim)", "ties"),
                          ("DARE-TIES (keep 30%)", "dare_ties"), ("Fisher (exact)", "fisher"),
                          ("Fisher (sampled)", "fisher"), ("Fisher (empirical)", "fisher"), ("RegMean", "regmean"),
                          ("components (top 2 of 8 per model)", "components"), ("TSV-M", "tsv"), ("Iso-C", "iso_c"),
                          ("Iso-CTS (common 80%)", "iso_cts"), ("data-subspace TSV (ours)", "data_tsv"),
                          ("data-subspace TSV, isotropic (ours)", "data_tsv")):
        assert rows[label]["method"] == method   # the id decomp.merge takes, beside the display label
    # the parameters merged with, the coefficient chosen on validation among them
    assert rows["TIES (top 20%, global trim)"]["parameters"]["density"] == 0.2
    assert rows["task arithmetic"]["parameters"]["scale"] in results["sizes"]["sum grid"]
    assert rows["data-subspace TSV, isotropic (ours)"]["parameters"]["isotropic"] is True
    assert rows["Iso-C"]["parameters"]["scale"] in results["sizes"]["iso grid"]
    assert rows["RegMean"]["chosen"].startswith(f"α={rows['RegMean']['parameters']['alpha']}")
    assert rows["components (top 2 of 8 per model)"]["parameters"]["select"] == [[0, 1]] * len(TASKS)
    # every stage's seconds and peak resident memory: 7.8 GB before the statistics moved to disk, 2.7 GB before the
    # merges went blockwise, 2.14 GB before the statistics left out the frozen word embeddings; measured since:
    # 1.27-1.55 GB per merge, 1.76 GB for the component Fishers' second pass (the run's peak; issue #18's target 2 GB)
    assert set(results["peak_memory_mib"]) == set(results["timings"])
    assert results["peak_mib"] is None or results["peak_mib"] < 2048, results["peak_memory_mib"]
    merges = {row["label"]: row["peak_memory_mib"] for row in results["merging"]["rows"] if not row["baseline"]}
    assert all(peak is None or peak < 1792 for peak in merges.values()), merges
    for row in results["merging"]["rows"]:
        for task in TASKS:
            assert 0.0 <= row[task.name] <= 1.0
        assert math.isfinite(row["normalised mean"])
    assert all(-0.1 <= row[key] <= 1 for row in results["decomposition"]["rows"]    # AMI is ~0 by chance
               for key in ("AMI fresh/rotten/plot", "AMI review/plot"))
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and "<table>" in page and "Fisher (exact)" in page
    assert "peak memory (MiB)" in page
    assert (out / "results.md").read_text().startswith("# decomp demo (quick)")
    # the second run reuses the cached fine-tunes, and `decomp report` re-renders the page
    models = sorted(p.name for p in (out / "models").iterdir())
    assert len(models) == 3 and not any(name.endswith(".partial") for name in models)
    again = subprocess.run([sys.executable, "-m", "decomp", "report", str(out)], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and (out / "report.html").read_text() == page
