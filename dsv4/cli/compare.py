"""Compare training runs: their loss curves in one plot and a table of final numbers.

    dsv4 compare runs/v4 runs/adamw runs/no-mhc --plot compare.png
"""
from __future__ import annotations

import argparse
import json
import os

from ..errors import DsV4Error
from ..train.metrics import read_metrics


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    p.add_argument("--plot", default="compare.png", help="output image (default compare.png)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")


def summarize(run: str) -> tuple[dict, list[dict]]:
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run}: no metrics.jsonl (not a dsv4 training run?)")
    rows = read_metrics(path)
    if not rows:
        raise DsV4Error(f"{run}: metrics.jsonl is empty")
    logged = [r for r in rows if "lm" in r]
    vals = [r for r in rows if "val_loss" in r]
    speed = [r["tok_per_s"] for r in logged[1:]] or [r["tok_per_s"] for r in logged] or [0.0]
    row = {"run": os.path.basename(os.path.normpath(run)), "steps": rows[-1]["step"], "tokens": rows[-1]["tokens"],
           "train_loss": logged[-1]["lm"] if logged else None, "val_loss": vals[-1]["val_loss"] if vals else None,
           "best_val_loss": min((r["val_loss"] for r in vals), default=None),
           "tok_per_s": sum(speed) / len(speed), "mhc_gain": logged[-1].get("mhc_gain") if logged else None,
           "peak_mem_gb": max((r.get("peak_mem_gb", 0.0) for r in logged), default=0.0) or None}
    return row, rows


def run(args: argparse.Namespace) -> int:
    from ..train.plots import plot_losses

    table, curves = [], {}
    for r in args.runs:
        row, rows = summarize(r)
        table.append(row)
        curves[row["run"]] = rows
    plot_losses(curves, args.plot)
    if args.json:
        print(json.dumps(table))
        return 0
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    print(f"{'run':<22}{'steps':>7}{'tokens':>12}{'train loss':>12}{'val loss':>10}{'tok/s':>10}{'mHC gain':>10}"
          f"{'peak GB':>9}")
    for t in table:
        print(f"{t['run']:<22}{t['steps']:>7}{t['tokens']:>12,}{fmt(t['train_loss'], '.3f'):>12}"
              f"{fmt(t['val_loss'], '.3f'):>10}{fmt(t['tok_per_s'], ',.0f'):>10}{fmt(t['mhc_gain'], '.3f'):>10}"
              f"{fmt(t['peak_mem_gb'], '.1f'):>9}")
    print(f"plot: {args.plot}")
    return 0
