"""The project's GPU performance targets checked against benchmark JSON: one table, met or not, from the files
`bench/e2e.py` and `bench/kernels.py` write (bench/results/<date>_<device>_<commit>_e2e.json, ..._kernels.json).
With several e2e files each target comes from the last file that has what it needs; a ratio to the peer only
ever pairs measurements of the same run (file). BENCHMARKS.md shows the command behind its table.

    python bench/targets.py --e2e E2E.json [more.json ...] --kernels KERNELS.json [more.json ...]
                            [--out table.md] [--plot targets.png]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

# the weight-read roofline of a batch-1 decode token the issue quotes (~1,000 tok/s on an H100)
ISSUE_DECODE_ROOFLINE_TOK_S = 990.0


@dataclass
class Row:
    target: str
    measured: str
    status: str  # "met", "not met", "reported", "missing"
    score: float | None = None  # measured / target for numeric targets (>= 1: met), for the plot


def load_runs(paths: list[str]) -> list[dict[tuple[str, int], dict]]:
    """Per file: (measurement name, tokens or context) -> result."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append({(r["name"], r.get("tokens", r.get("context"))): r for r in json.load(f)["results"]})
    return runs


def _ok(r: dict | None) -> bool:
    return r is not None and "error" not in r


def _best(results: dict, prefix: str, size: int) -> tuple[str, dict] | None:
    """The fastest successful measurement whose name starts with `prefix` at `size` (e.g. training with the
    compiled references or with the Triton training kernels)."""
    found = [(name, r) for (name, n), r in results.items() if name.startswith(prefix) and n == size and _ok(r)]
    return max(found, key=lambda t: t[1]["tok_per_s"]) if found else None


def _prefill_8k(results: dict) -> Row | None:
    ours, peer = results.get(("dsv4 prefill", 8192)), results.get(("transformers prefill", 8192))
    if not (_ok(ours) and _ok(peer)):
        return None
    ratio = ours["tok_per_s"] / peer["tok_per_s"]
    return Row("prefill 8K >= 8x the peer", f"{ours['tok_per_s']:,.0f} vs {peer['tok_per_s']:,.0f} tok/s: {ratio:.1f}x",
               "met" if ratio >= 8 else "not met", ratio / 8)


def _prefill_1m(results: dict) -> Row | None:
    r = results.get(("dsv4 prefill", 1 << 20))
    return Row("prefill a 1M-token prompt on one GPU", f"{r['seconds']:.1f} s, {r['peak_gb']:.1f} GB peak",
               "met") if _ok(r) else None


def _decode_128k(results: dict) -> Row | None:
    r = results.get(("dsv4 decode b1", 131072))
    if not _ok(r):
        return None
    frac = r["tok_per_s"] / ISSUE_DECODE_ROOFLINE_TOK_S
    return Row("decode batch 1 at 128K >= 400 tok/s", f"{r['tok_per_s']:,.0f} tok/s ({100 * frac:.0f}% of "
               f"~{ISSUE_DECODE_ROOFLINE_TOK_S:,.0f})", "met" if r["tok_per_s"] >= 400 else "not met",
               r["tok_per_s"] / 400)


def _decode_b64(results: dict) -> Row | None:
    r = results.get(("dsv4 decode b64", 32768))
    return Row("decode batch 64 at 32K: tok/s", f"{r['tok_per_s']:,.0f} tok/s", "reported") if _ok(r) else None


def _train_4k(results: dict) -> Row | None:
    ours, peer = _best(results, "dsv4 train fwd+bwd", 4096), results.get(("transformers train fwd+bwd", 4096))
    if not (ours and _ok(peer)):
        return None
    ratio = ours[1]["tok_per_s"] / peer["tok_per_s"]
    return Row("training fwd+bwd at 4K >= 3x the peer", f"{ours[1]['tok_per_s']:,.0f} vs {peer['tok_per_s']:,.0f} "
               f"tok/s: {ratio:.2f}x ({ours[0]})", "met" if ratio >= 3 else "not met", ratio / 3)


def _train_64k(results: dict) -> Row | None:
    step = _best(results, "dsv4 train fwd+bwd (block recompute)", 65536)
    return Row("a training step at 64K fits on one GPU", f"{step[1]['peak_gb']:.1f} GB, {step[1]['seconds']:.1f} s "
               f"({step[0]})", "met") if step else None


E2E_TARGETS = {"prefill 8K >= 8x the peer": _prefill_8k, "prefill a 1M-token prompt on one GPU": _prefill_1m,
               "decode batch 1 at 128K >= 400 tok/s": _decode_128k, "decode batch 64 at 32K: tok/s": _decode_b64,
               "training fwd+bwd at 4K >= 3x the peer": _train_4k, "a training step at 64K fits on one GPU": _train_64k}


def e2e_rows(runs: list[dict]) -> list[Row]:
    """Each target from the last run that measured it."""
    rows = []
    for target, check in E2E_TARGETS.items():
        found = next((row for row in map(check, reversed(runs)) if row is not None), None)
        rows.append(found or Row(target, "-", "missing"))
    return rows


def kernel_rows(kernels: dict, target: float = 0.7) -> list[Row]:
    """Each attention-side decode kernel at batch 64: achieved bandwidth against the device copy."""
    rows = []
    cases = [r for r in kernels["attention"] if r["S"] == 1 and r["B"] == 64]
    cases += [r for r in kernels["indexer"] if r["S"] == 1 and r["B"] == 64]
    for r in cases:
        frac = r["frac_copy_bw"]
        gbps = r.get("triton_gbps", r.get("scores_gbps"))
        rows.append(Row(f"{r['case']}: >= {100 * target:.0f}% of copy bandwidth",
                        f"{gbps:,.0f} GB/s = {100 * frac:.0f}% of {kernels['ceilings']['copy_gbps']:,.0f}",
                        "met" if frac >= target else "not met", frac / target))
    return rows


def latest_kernel_rows(paths: list[str]) -> list[Row]:
    """kernel_rows of several runs; a case measured in several comes from the last file that has it."""
    latest: dict[str, Row] = {}
    for path in paths:
        with open(path) as f:
            latest.update((r.target, r) for r in kernel_rows(json.load(f)))
    return list(latest.values())


def table(rows: list[Row]) -> str:
    lines = ["| target | measured | status |", "|---|---|---|"]
    lines += [f"| {r.target} | {r.measured} | {r.status} |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    """Each numeric target's measured / target as a bar (met at >= 1), its measurement beside it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [r for r in rows if r.score is not None]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(shown) + 1.2))
    ax.barh(range(len(shown)), [r.score for r in shown], color=["tab:green" if r.score >= 1 else "tab:red"
                                                                  for r in shown])
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(range(len(shown)), [r.target for r in shown], fontsize=8)
    ax.invert_yaxis()
    for i, r in enumerate(shown):
        ax.text(r.score + 0.02, i, r.measured.split(" (")[0], va="center", fontsize=7)
    ax.set_xlim(0, max(2.0, 1.6 * max(r.score for r in shown)))
    ax.set_xlabel("measured / target (>= 1: met)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--e2e", nargs="+", required=True)
    p.add_argument("--kernels", nargs="*", default=[],
                   help="kernels.py JSON files; a case in several comes from the last (each against its own run's copy)")
    p.add_argument("--out")
    p.add_argument("--plot", help="write measured / target as a bar chart (PNG) here")
    a = p.parse_args()
    rows = e2e_rows(load_runs(a.e2e))
    rows += latest_kernel_rows(a.kernels)
    text = table(rows)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    if a.plot:
        plot(rows, a.plot)


if __name__ == "__main__":
    main()
