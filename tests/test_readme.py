"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # the examples write files
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no Python example"
    namespace = {}
    exec(compile("\n".join(blocks), str(README), "exec"), namespace)
    assert namespace["z"].shape == (4, 512)
    assert namespace["kron"].shape == (namespace["N"], 256)
    assert namespace["sketch"].features.shape[0] == 8 and (tmp_path / "fisher.safetensors").exists()
    assert len(namespace["directions"]) == 3 and (tmp_path / "merged-model" / "config.json").exists()
