"""The README's Python code blocks run as pasted, in order, in one namespace (the export block reuses the API's
layer)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 2, "the README lost its API and compile/export examples"
    monkeypatch.chdir(tmp_path)  # the export block writes layer.pt2
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), scope)
    assert scope["y"].shape == (2, 512, 1024)  # the compiled layer's output, last assignment of y
    assert scope["logits"].shape == (1, 512, 1000)
    assert (tmp_path / "layer.pt2").stat().st_size > 0
