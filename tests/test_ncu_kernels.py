"""benchmarks/ncu_kernels.py: reading an Nsight Compute report, its case checks, and (GPU) each case's launch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import load_benchmark_script

ROOT = Path(__file__).resolve().parents[1]

# Lines as ncu 2025.3 prints them (SpeedOfLight, MemoryWorkloadAnalysis, LaunchStats, Occupancy sections)
REPORT = """
    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    Metric Name             Metric Unit Metric Value
    ----------------------- ----------- ------------
    DRAM Throughput                   %        29.52
    Duration                         us       523.04
    L2 Cache Throughput               %        47.65
    Compute (SM) Throughput           %        26.11
    OPT   Est. Local Speedup: 64.53%
    Local Memory Spilling Requests                          611,328
    Local Memory Spilling Request Overhead           %      no data
    Registers Per Thread             register/thread               255
    Dynamic Shared Memory Per Block      Kbyte/block            131.07
    OPT   Est. Speedup: 3.03%
    Achieved Occupancy                        %        12.37
"""


def test_headlines_reads_each_figure_and_the_largest_estimated_speedup():
    ncu_kernels = load_benchmark_script("ncu_kernels")
    assert ncu_kernels.headlines(REPORT) == {
        "duration": "523.04 us", "SM %": "26.11", "L2 %": "47.65", "DRAM %": "29.52", "registers": "255",
        "spill requests": "611,328", "shared KB": "131.07", "occupancy %": "12.37", "best est. speedup %": 64.53}
    assert ncu_kernels.headlines("no report: ncu failed") == {"best est. speedup %": None}


def test_unknown_case_is_refused_before_anything_runs():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ncu_kernels.py"), "--cases", "mla128,gemm9"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert "unknown case(s) gemm9; choose from" in result.stderr and "mla128" in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ["dgrad_h_small", "wgrad_down_v3", "gemm1_v3", "mla16", "gluon_wgrad_down_add_v3"])
def test_each_case_launches(case):
    load_benchmark_script("ncu_kernels").launch(case, repeats=1)
