"""benchmarks/bench_moe_layer.py: the host hotspot list of its `profile` part (the rest needs a GPU)."""

import time

from .helpers import load_benchmark_script

bench = load_benchmark_script("bench_moe_layer")


def test_host_hotspots_rank_functions_by_their_own_time(monkeypatch):
    monkeypatch.setattr(bench, "dev", "cpu")  # what --dry-run sets
    def slow():
        time.sleep(0.004)  # own time of time.sleep, inside slow

    def cheap():
        return sum(range(10))

    def step():
        slow()
        for _ in range(3):
            cheap()

    rows = bench.host_hotspots(step, iterations=4, top=5)
    functions = [row[0] for row in rows]
    assert "sleep" in functions[0]  # the most time of its own, per iteration
    sleep_ms, calls, cumulative_ms = rows[0][1:]
    assert 3.5 <= sleep_ms <= 40 and calls == 1 and cumulative_ms >= sleep_ms
    cheap_row = next(row for row in rows if row[0].endswith(":cheap"))
    assert cheap_row[2] == 3  # calls per iteration
    assert len(rows) <= 5
