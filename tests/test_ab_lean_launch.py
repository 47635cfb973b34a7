"""benchmarks/ab_lean_launch.py: its rounds (the timings need a GPU)."""

from .helpers import load_benchmark_script

ab = load_benchmark_script("ab_lean_launch")


def test_rounds_alternate_the_sides_and_run_a_through_tritons_path():
    seen = []

    def measure(side):
        seen.append((side, ab.lean._LEAN))
        return {"A": [3.0, 9.0, 3.0, 1.0], "B": [2.0] * 4, "hf": [5.0] * 4}[side][sum(s == side for s, _ in seen) - 1]

    medians = ab.rounds({"ms": measure}, 4)
    assert medians == {"A": {"ms": 3.0}, "B": {"ms": 2.0}, "hf": {"ms": 5.0}}
    assert [side for side, _ in seen[:6]] == ["A", "B", "hf", "hf", "B", "A"]
    assert all(lean_on == (side != "A") for side, lean_on in seen)
    assert ab.lean._LEAN  # left on
