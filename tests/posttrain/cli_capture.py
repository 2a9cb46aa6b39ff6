"""The PipelineConfig `dsv4 posttrain ARGS` would run, without running it: for the CLI tests."""
from __future__ import annotations

import argparse

from dsv4.posttrain.pipeline import PipelineConfig


def posttrain_config(monkeypatch, argv: list[str]) -> PipelineConfig:
    """The config `dsv4 posttrain --out x ARGV` hands the pipeline (run_pipeline and the summary stubbed out)."""
    import dsv4.posttrain.pipeline as pipeline
    from dsv4.cli import posttrain as cli
    seen = {}
    monkeypatch.setattr(pipeline, "run_pipeline", lambda out, cfg: seen.setdefault("cfg", cfg) and
                        {"total_seconds": 0.0})
    monkeypatch.setattr(pipeline, "summary_table", lambda summary: "")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    cli.run(parser.parse_args(["--out", "x", *argv]))
    return seen["cfg"]
