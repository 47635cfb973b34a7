"""benchmarks/ab_candidate.sh on a scratch tree: B runs see the patch, A runs and the tree afterwards do not."""

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATCH = "--- a/kernel.py\n+++ b/kernel.py\n@@ -1 +1 @@\n-speed = 1\n+speed = 2\n"


def run_script(tmp_path, kernel_source: str, *command: str) -> subprocess.CompletedProcess:
    """ab_candidate.sh copied into a scratch tree holding kernel.py, run with PATCH and `command`."""
    tree = tmp_path / "tree"
    (tree / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "ab_candidate.sh", tree / "benchmarks")
    (tree / "kernel.py").write_text(kernel_source)
    (tmp_path / "faster.patch").write_text(PATCH)
    return subprocess.run(["bash", str(tree / "benchmarks" / "ab_candidate.sh"), str(tmp_path / "faster.patch"),
                           *command], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OUT": str(tmp_path / "out"), "ROUNDS": "2"})


def test_runs_alternate_and_the_tree_is_restored(tmp_path):
    result = run_script(tmp_path, "speed = 1\n", "cat", "kernel.py")
    assert result.returncode == 0, result.stderr
    runs = {log.name: log.read_text() for log in (tmp_path / "out").iterdir()}
    assert runs == {"ab-A-1.log": "speed = 1\n", "ab-B-1.log": "speed = 2\n",
                    "ab-A-2.log": "speed = 1\n", "ab-B-2.log": "speed = 2\n"}
    assert (tmp_path / "tree" / "kernel.py").read_text() == "speed = 1\n"


def test_a_patch_that_does_not_apply_stops_before_any_run(tmp_path):
    result = run_script(tmp_path, "speed = 3\n", "true")
    assert result.returncode == 1 and "does not apply to this tree" in result.stderr
    assert not any((tmp_path / "out").iterdir())
