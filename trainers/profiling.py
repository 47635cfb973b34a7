"""Where the time of a few optimizer steps goes: torch.profiler over `--profile_steps`, summarised per rank.

Each rank writes `output_dir/profile/rank{r}.json`: the profiled steps' wall time, device time by category with each
category's share of that wall time, and the busiest kernels; on a GPU also how long it was busy and its longest idle
gaps between kernels, with what the host was doing meanwhile (`idle_gaps`). Device time is CUDA kernel time on a GPU,
and CPU op self time on the CPU (a gloo collective counts its whole duration on gloo's thread). A kernel or op inside
an op of a specific category counts in that category, and is listed as "op > kernel" (on the CPU,
`aten::_grouped_mm > aten::mm` is expert time, not a plain GEMM).

Reading the shares: kernels of different streams overlap (NCCL beside compute), so the shares can sum past 1; and a
collective's kernel time includes waiting for the slowest rank (for the all-to-all: imbalanced expert loads).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

CATEGORIES = ("all_to_all", "other_collectives", "routed_experts", "attention", "gemm", "other")
# Lower-case substrings of kernel or op names, tried in this order (a Triton `_grouped_gemm_kernel` is an expert
# kernel, not a gemm). NCCL has no all-to-all kernel: `all_to_all_single` runs as grouped send/recv, and nothing else
# in the trainer sends point to point.
CATEGORY_PATTERNS = (
    ("all_to_all", ("alltoall", "all_to_all", "all2all", "sendrecv")),
    ("other_collectives", ("allgather", "all_gather", "reducescatter", "reduce_scatter", "allreduce", "all_reduce",
                           "nccl", "gloo", "c10d::")),  # c10d::broadcast_, ncclDevKernel_Broadcast, ... too
    # kernels/fused_moe_kernels.py's Triton kernels, their custom ops and eager autograd nodes (_FusedMoE*Node), and
    # torch's grouped_mm (CUTLASS on a GPU)
    ("routed_experts", ("_gemm1_swiglu_kernel", "_grouped_gemm_kernel", "_dgrad_h_kernel", "_swiglu_backward_kernel",
                        "_grouped_wgrad_kernel", "_combine_kernel", "_schedule_kernel", "_route_", "fused_moe",
                        "fusedmoe",
                        "grouped_mm", "groupedmm", "groupproblemshape")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "mla_decode")),
    ("gemm", ("gemm", "gemv", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear",
              "cublas", "nvjet", "xmma", "cutlass", "splitkreduce")),
)
CONTEXT_CATEGORIES = ("all_to_all", "other_collectives", "routed_experts", "attention")
TOP_KERNELS = 15


def category(name: str) -> str:
    lowered = name.lower()
    for label, patterns in CATEGORY_PATTERNS:
        if any(pattern in lowered for pattern in patterns):
            return label
    return "other"


def time_by_category(events, wall_s: float, top: int = TOP_KERNELS) -> dict:
    """Summary of timed `events`, (name, seconds) pairs or (name, seconds, calls) for several calls summed: time and
    share of `wall_s` per category, and the `top` names by total time, with their number of calls."""
    by_name: dict[str, list] = {}
    for name, seconds, *calls in events:
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += seconds
        entry[1] += calls[0] if calls else 1
    times = dict.fromkeys(CATEGORIES, 0.0)
    for name, (seconds, _) in by_name.items():
        times[category(name)] += seconds
    busiest = sorted(by_name.items(), key=lambda item: item[1][0], reverse=True)[:top]
    return {
        "wall_s": wall_s,
        "device_time_s": sum(times.values()),
        "categories": {label: {"time_s": t, "share": t / wall_s} for label, t in times.items()},
        "top_kernels": [
            {"name": name[:300], "category": category(name), "time_s": seconds, "calls": calls,
             "share": seconds / wall_s}
            for name, (seconds, calls) in busiest
        ],
    }


def parse_profile_steps(text: str | None) -> tuple[int, int] | None:
    """'12,14' -> (12, 14); '12' -> (12, 12); None or '' -> None. Raises ValueError saying what is expected."""
    if text is None or not str(text).strip():
        return None
    try:
        steps = [int(part) for part in str(text).split(",")]
    except ValueError:
        steps = []
    if len(steps) == 1:
        steps *= 2
    if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
        raise ValueError(f"--profile_steps {text!r}: expected FIRST,LAST optimizer steps with 1 <= FIRST <= LAST "
                         "(e.g. 12,14), or one step.")
    return steps[0], steps[1]


def _context(event) -> str | None:
    """The name of the nearest op of a specific category enclosing `event` (itself included), if any."""
    while event is not None:
        if category(event.name) in CONTEXT_CATEGORIES:
            return event.name
        event = event.cpu_parent
    return None


def _device_events(events) -> list:
    """The GPU's kernels, memcpys and memsets, without the ranges that `record_function` annotates on the GPU's
    timeline (`Optimizer.step#AdamW.step` spans the optimizer's kernels: counting it would count them twice)."""
    from torch.autograd import DeviceType

    return [event for event in events
            if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)]


def idle_gaps(intervals: list[tuple[float, float, str]], top: int = 10,
              host_ops: list[tuple[float, float, str]] = ()) -> dict:
    """How long the device was busy over `intervals` (start_us, end_us, kernel name), counting overlaps once, and its
    `top` longest idle gaps between kernels, each with the kernels before and after it and, from `host_ops` (start_us,
    end_us, name of the host's ops), the outermost and innermost op the host was in at the gap's middle: what it was
    busy with while the device waited."""
    busy, gaps = 0.0, []
    end, previous = None, None
    for start, stop, name in sorted(intervals):
        if end is None or start >= end:
            busy += stop - start
            if end is not None:
                gaps.append((start - end, end, previous, name))
            end, previous = stop, name
        elif stop > end:
            busy += stop - end
            end, previous = stop, name
    gaps.sort(key=lambda gap: gap[0], reverse=True)
    longest = []
    for length, gap_start, before, after in gaps[:top]:
        middle = gap_start + length / 2
        # enclosing ops, outermost first (longest first among those that contain the middle)
        around = sorted((op for op in host_ops if op[0] <= middle < op[1]), key=lambda op: op[0] - op[1])
        longest.append({"gap_us": round(length, 1), "after": before[:120], "before": after[:120],
                        "host_outer": around[0][2][:120] if around else None,
                        "host_inner": around[-1][2][:120] if around else None})
    return {"busy_s": busy / 1e6, "idle_between_kernels_s": sum(g[0] for g in gaps) / 1e6, "longest_gaps": longest}


def _timed_events(profiler, device_type: str) -> list[tuple]:
    """(name, seconds) of every CUDA kernel / memcpy / memset on a GPU, of every CPU op (self time) on the CPU; named
    "op > name" inside an op of a specific category. The GPU's other kernels come summed per name, with their number
    of calls: (name, seconds, calls)."""
    from torch.autograd import DeviceType

    events = profiler.events()
    if device_type != "cuda":
        timed = []
        for event in events:
            if event.device_type == DeviceType.CPU:
                context = _context(event.cpu_parent)
                micros = event.cpu_time_total if event.is_async else event.self_cpu_time_total
                timed.append((f"{context} > {event.name}" if context else event.name, micros / 1e6))
        return timed
    unattributed: dict[str, list] = {}  # kernel name -> [microseconds, calls], every kernel
    for event in _device_events(events):
        entry = unattributed.setdefault(event.name, [0.0, 0])
        entry[0] += event.time_range.elapsed_us()
        entry[1] += 1
    timed = []
    for event in events:  # the kernels an op of a specific category launched
        context = _context(event) if event.device_type == DeviceType.CPU and event.kernels else None
        for kernel in event.kernels if context else ():
            timed.append((f"{context} > {kernel.name}", kernel.duration / 1e6))
            entry = unattributed.setdefault(kernel.name, [0.0, 0])
            entry[0] -= kernel.duration
            entry[1] -= 1
    return timed + [(name, max(micros, 0.0) / 1e6, calls) for name, (micros, calls) in unattributed.items()
                    if calls > 0]


class StepProfiler:
    """torch.profiler from the start of optimizer step `first` to the end of step `last`: call `start_if(step)`
    before a step and `stop_if(step)` after it; the latter returns this rank's summary at `last`, with its `top`
    busiest kernels."""

    def __init__(self, steps: tuple[int, int], folder, rank: int, device: torch.device, trace: bool = False,
                 top: int = TOP_KERNELS):
        self.first, self.last = steps
        self.folder, self.rank, self.device, self.trace, self.top = Path(folder), rank, device, trace, top
        self._profiler, self._start = None, 0.0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start_if(self, step: int):
        if step != self.first:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._sync()
        self._profiler = profile(activities=activities)
        self._profiler.start()
        self._sync()
        self._start = time.perf_counter()

    def stop_if(self, step: int) -> dict | None:
        if step != self.last or self._profiler is None:
            return None
        self._sync()
        wall = time.perf_counter() - self._start
        self._profiler.stop()
        summary = {
            "rank": self.rank, "steps": [self.first, self.last],
            "time_source": "CUDA kernels" if self.device.type == "cuda" else "CPU op self time",
            **time_by_category(_timed_events(self._profiler, self.device.type), wall, self.top),
        }
        if self.device.type == "cuda":
            from torch.autograd import DeviceType

            events = self._profiler.events()
            host = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == DeviceType.CPU]
            summary["device"] = idle_gaps([(e.time_range.start, e.time_range.end, e.name)
                                           for e in _device_events(events)], self.top, host)
        summary["step_wall_s"] = wall / (self.last - self.first + 1)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{self.rank}.json").write_text(json.dumps(summary, indent=1))
        if self.trace and self.rank == 0:
            self._profiler.export_chrome_trace(str(self.folder / "trace_rank0.json.gz"))  # gzip by suffix
        self._profiler = None
        return summary


def profile_record(summaries: list[dict]) -> dict:
    """The metrics.jsonl line of the ranks' summaries: the category shares averaged over the ranks, and the all-to-all
    share's maximum over them."""
    shares = {label: sum(s["categories"][label]["share"] for s in summaries) / len(summaries) for label in CATEGORIES}
    first = summaries[0]
    return {
        "step": first["steps"][1],
        "kind": "profile",
        "profile_steps": first["steps"],
        "profile_wall_s": max(s["wall_s"] for s in summaries),
        "time_source": first["time_source"],
        "all_to_all_share": shares["all_to_all"],
        "all_to_all_share_max": max(s["categories"]["all_to_all"]["share"] for s in summaries),
        "shares": shares,
        "top_categories": sorted(shares, key=shares.get, reverse=True)[:3],
    }
