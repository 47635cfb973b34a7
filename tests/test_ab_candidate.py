"""benchmarks/ab_candidate.sh on a scratch tree: B runs see the patch, A runs and the tree afterwards do not."""

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_runs_alternate_and_the_tree_is_restored(tmp_path):
    tree = tmp_path / "tree"
    (tree / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "ab_candidate.sh", tree / "benchmarks")
    (tree / "kernel.py").write_text("speed = 1\n")
    patch = tmp_path / "faster.patch"
    patch.write_text("--- a/kernel.py\n+++ b/kernel.py\n@@ -1 +1 @@\n-speed = 1\n+speed = 2\n")
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(tree / "benchmarks" / "ab_candidate.sh"), str(patch), "cat", "kernel.py"],
                            cwd=tmp_path, env={**os.environ, "OUT": str(out), "ROUNDS": "2"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    runs = {log.name: log.read_text() for log in out.iterdir()}
    assert runs == {"ab-A-1.log": "speed = 1\n", "ab-B-1.log": "speed = 2\n",
                    "ab-A-2.log": "speed = 1\n", "ab-B-2.log": "speed = 2\n"}
    assert (tree / "kernel.py").read_text() == "speed = 1\n"


def test_a_patch_that_does_not_apply_stops_before_any_run(tmp_path):
    tree = tmp_path / "tree"
    (tree / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "ab_candidate.sh", tree / "benchmarks")
    (tree / "kernel.py").write_text("speed = 3\n")
    patch = tmp_path / "stale.patch"
    patch.write_text("--- a/kernel.py\n+++ b/kernel.py\n@@ -1 +1 @@\n-speed = 1\n+speed = 2\n")
    result = subprocess.run(["bash", str(tree / "benchmarks" / "ab_candidate.sh"), str(patch), "true"],
                            env={**os.environ, "OUT": str(tmp_path / "out")}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "does not apply to this tree" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
