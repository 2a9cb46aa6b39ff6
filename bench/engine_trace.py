"""Where a serving load's wall time went, from an engine step trace (`dsv4 serve --trace FILE`, or
`Engine(..., trace=FILE)`; the line format is in dsv4/serve/steptrace.py).

The trace is cut into segments at idle gaps longer than `--gap` seconds (a load level, the probes before it, the
warm-up), and each segment's wall time (first step's start to last step's end) is split into: steps that only
decoded, steps that ran prompt chunks (with or without decode rows), and idle time between steps (the engine
waiting for requests, or for the GIL). Per kind of step: count, total and p50/p90/p99 ms; the host part before the
decode's launch, the waits for device results and the hand-out of results; the engine thread's CPU time outside
those waits (`cpu_ms`) and the rest (`off_cpu_ms` = ms - wait - cpu: the thread runnable but not running, e.g.
while the HTTP server's thread holds the GIL); the share of decode steps that ran fewer rows than the engine's
batch; tokens emitted and output tok/s over the segment.

    python bench/engine_trace.py TRACE.jsonl [--gap 1.0] [--min-steps 20] [--slowest 10] [--json]

`--slowest N` also lists the N longest steps with every field of their trace lines (and the step before each), so
that outliers can be read from the summary alone when the trace itself is too large to keep.
"""
from __future__ import annotations

import argparse
import json
import sys


def pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile q in [0, 1] (None for no data)."""
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))], 3)


def kind(step: dict) -> str:
    if step["prefill_tokens"] and step["decode_rows"]:
        return "mixed"
    return "prefill" if step["prefill_tokens"] else "decode" if step["decode_rows"] else "empty"


def summarise(steps: list[dict], max_batch: int | None) -> dict:
    """The summary of consecutive steps (see the module doc)."""
    if not steps:
        return dict(steps=0)
    span_ms = 1e3 * (steps[-1]["t"] - steps[0]["t"]) + steps[-1]["ms"]
    idle = [s["idle_ms"] for s in steps[1:] if s["idle_ms"] is not None]
    out = dict(steps=len(steps), span_ms=round(span_ms, 1), tokens=sum(s["emitted"] for s in steps),
               step_ms_total=round(sum(s["ms"] for s in steps), 1), idle_ms_total=round(sum(idle), 1),
               idle_ms_p50=pct(idle, 0.5), idle_ms_p99=pct(idle, 0.99),
               prefill_tokens=sum(s["prefill_tokens"] for s in steps),
               prefill_forwards=sum(s.get("prefill_forwards", 0) for s in steps),
               wait_ms_total=round(sum(s["wait_ms"] for s in steps), 1),
               deliver_ms_total=round(sum(s["deliver_ms"] for s in steps), 1),
               save_ms_total=round(sum(s.get("save_ms", 0.0) for s in steps), 1))
    ended = [s for s in steps if s["finished"]]
    if ended:   # (the hand-out of steps where requests end: their prefix-cache snapshots, their streams' last events)
        out["finishing_steps"] = dict(steps=len(ended), requests=sum(s["finished"] for s in ended),
                                      deliver_ms_p50=pct([s["deliver_ms"] for s in ended], 0.5),
                                      save_ms_p50=pct([s.get("save_ms", 0.0) for s in ended], 0.5))
    out["output_tok_per_s"] = round(out["tokens"] / span_ms * 1e3, 1) if span_ms > 0 else None
    for k in ("decode", "prefill", "mixed", "empty"):
        ks = [s for s in steps if kind(s) == k]
        ms = [s["ms"] for s in ks]
        out[f"{k}_steps"] = len(ks)
        if not ks:
            continue
        out[k] = dict(ms_total=round(sum(ms), 1), ms_p50=pct(ms, 0.5), ms_p90=pct(ms, 0.9), ms_p99=pct(ms, 0.99),
                      wait_ms_p50=pct([s["wait_ms"] for s in ks], 0.5),
                      deliver_ms_p50=pct([s["deliver_ms"] for s in ks], 0.5),
                      other_host_ms_p50=pct([s["ms"] - s["wait_ms"] - s["deliver_ms"] for s in ks], 0.5))
        timed = [s for s in ks if s.get("cpu_ms") is not None]   # (traces from before cpu_ms have none)
        if timed:   # the engine thread on the CPU outside its waits, and neither running nor waiting for the device
            out[k].update(cpu_ms_p50=pct([s["cpu_ms"] for s in timed], 0.5),
                          off_cpu_ms_p50=pct([s["ms"] - s["wait_ms"] - s["cpu_ms"] for s in timed], 0.5))
        launched = [s["host_ms"] for s in ks if s["host_ms"] is not None]
        if launched:
            out[k].update(host_before_launch_ms_p50=pct(launched, 0.5), host_before_launch_ms_p99=pct(launched, 0.99))
        rows = [s["decode_rows"] for s in ks if s["decode_rows"]]
        if rows:
            out[k].update(decode_rows_p50=pct(rows, 0.5), graph_share=round(
                sum(s["graph"] is not None for s in ks) / len(ks), 3))
            if max_batch:
                out[k]["under_full_batch_share"] = round(sum(r < max_batch for r in rows) / len(rows), 3)
    out["ms_share"] = {k: round(out[k]["ms_total"] / span_ms, 3) for k in ("decode", "prefill", "mixed", "empty")
                       if k in out and span_ms > 0}
    out["ms_share"]["idle"] = round(out["idle_ms_total"] / span_ms, 3) if span_ms > 0 else None
    return out


def segments(steps: list[dict], gap_s: float) -> list[list[dict]]:
    """Runs of steps with no idle gap over gap_s seconds between them."""
    out: list[list[dict]] = []
    for s in steps:
        if not out or (s["idle_ms"] is not None and s["idle_ms"] > 1e3 * gap_s):
            out.append([])
        out[-1].append(s)
    return out


def load(path: str) -> tuple[dict, list[dict]]:
    header, steps = {}, []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            if "header" in rec:
                header = rec["header"]   # (a restarted engine writes a new one: the last wins)
            else:
                steps.append(rec)
    return header, steps


def slowest(steps: list[dict], n: int) -> list[dict]:
    """The n longest steps, longest first: their index in the trace, their line and the line before them."""
    order = sorted(range(len(steps)), key=lambda i: steps[i]["ms"], reverse=True)[:max(0, n)]
    return [dict(index=i, step=steps[i], before=steps[i - 1] if i else None) for i in order]


def report(name: str, s: dict) -> str:
    if not s.get("steps"):
        return f"{name}: no steps"
    lines = [f"{name}: {s['steps']} steps over {s['span_ms'] / 1e3:.3f} s, {s['tokens']} tokens "
             f"({s['output_tok_per_s']} tok/s), {s['prefill_tokens']} prompt tokens in {s['prefill_forwards']} "
             f"forwards",
             "  wall time: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in s["ms_share"].items() if v is not None)
             + f"  (idle {s['idle_ms_total']:.0f} ms, p50 gap {s['idle_ms_p50']} ms, p99 {s['idle_ms_p99']} ms)",
             f"  waits for device results {s['wait_ms_total']:.0f} ms, handing out results {s['deliver_ms_total']:.0f}"
             f" ms, prefix-cache saves {s['save_ms_total']:.0f} ms"]
    if "finishing_steps" in s:
        f = s["finishing_steps"]
        lines.append(f"  steps ending requests: {f['steps']} ({f['requests']} requests), hand-out p50 "
                     f"{f['deliver_ms_p50']} ms, saves p50 {f['save_ms_p50']} ms")
    for k in ("decode", "prefill", "mixed", "empty"):
        if k in s:
            d = s[k]
            extra = "".join(f", {key} {d[key]}" for key in ("cpu_ms_p50", "off_cpu_ms_p50",
                                                           "host_before_launch_ms_p50", "host_before_launch_ms_p99",
                                                           "decode_rows_p50", "graph_share",
                                                           "under_full_batch_share") if key in d)
            lines.append(f"  {k:7s} {s[k + '_steps']:6d} steps, {d['ms_total']:9.1f} ms: p50 {d['ms_p50']} p90 "
                         f"{d['ms_p90']} p99 {d['ms_p99']} ms (wait p50 {d['wait_ms_p50']}, hand-out p50 "
                         f"{d['deliver_ms_p50']}, other host p50 {d['other_host_ms_p50']}{extra})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace")
    p.add_argument("--gap", type=float, default=1.0, help="idle seconds that start a new segment")
    p.add_argument("--min-steps", type=int, default=20, help="segments with fewer steps are only counted in the total")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--slowest", type=int, default=0, help="list the N longest steps with all their fields")
    a = p.parse_args(argv)
    header, steps = load(a.trace)
    max_batch = header.get("max_batch")
    total = summarise(steps, max_batch)
    segs = [summarise(seg, max_batch) for seg in segments(steps, a.gap)]
    total["segments"] = [s for s in segs if s.get("steps", 0) >= a.min_steps]
    slow = slowest(steps, a.slowest)
    if a.json:
        json.dump(dict(total, header=header, slowest=slow), sys.stdout)
        print()
        return
    print(f"engine: {json.dumps(header)}")
    print(report("all steps", total))
    for i, s in enumerate(total["segments"]):
        print(report(f"segment {i}", s))
    if slow:
        print(f"the {len(slow)} longest steps (step index, its fields; then the step before it):")
        for item in slow:
            print(f"  #{item['index']}: {json.dumps(item['step'])}")
            if item["before"] is not None:
                print(f"     before: {json.dumps(item['before'])}")


if __name__ == "__main__":
    main()
