"""The README's quickstart runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quickstart_runs(tmp_path, monkeypatch):
    quickstart = re.search(r"## Quickstart\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(quickstart, str(README), "exec"), namespace)
    assert namespace["reloaded"].num_parameters_summary() == namespace["model"].num_parameters_summary()
    assert (tmp_path / "my-moe" / "modeling_moe.py").is_file()
