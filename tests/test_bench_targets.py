"""bench/targets.py: the issue's targets from benchmark JSON (synthetic runs)."""
import json
import os
import re
import shlex
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import targets  # noqa: E402


def _write(tmp_path, name, results):
    path = tmp_path / name
    path.write_text(json.dumps({"device": "test", "results": results}))
    return str(path)


def test_ratios_pair_measurements_of_one_run_and_training_takes_the_faster_path(tmp_path):
    first = _write(tmp_path, "a.json", [
        {"name": "dsv4 prefill", "tokens": 8192, "tok_per_s": 90.0, "seconds": 1, "peak_gb": 1},
        {"name": "transformers prefill", "tokens": 8192, "tok_per_s": 10.0, "seconds": 1, "peak_gb": 1},
        {"name": "dsv4 train fwd+bwd", "tokens": 4096, "tok_per_s": 25.0, "seconds": 1, "peak_gb": 1},
        {"name": "dsv4 train fwd+bwd (triton train)", "tokens": 4096, "tok_per_s": 31.0, "seconds": 1, "peak_gb": 1},
        {"name": "transformers train fwd+bwd", "tokens": 4096, "tok_per_s": 10.0, "seconds": 1, "peak_gb": 1},
        {"name": "dsv4 decode b1", "context": 131072, "tok_per_s": 390.0, "ms_per_step": 2.6, "peak_gb": 1}])
    # a later run without the peer: its prefill is not paired with the first run's peer
    second = _write(tmp_path, "b.json", [
        {"name": "dsv4 prefill", "tokens": 8192, "tok_per_s": 500.0, "seconds": 1, "peak_gb": 1},
        {"name": "dsv4 decode b1", "context": 131072, "tok_per_s": 410.0, "ms_per_step": 2.4, "peak_gb": 1},
        {"name": "dsv4 train fwd+bwd (block recompute)", "tokens": 65536, "error": "out of memory"}])
    rows = {r.target: r for r in targets.e2e_rows(targets.load_runs([first, second]))}
    assert rows["prefill 8K >= 8x the peer"].status == "met" and "9.0x" in rows["prefill 8K >= 8x the peer"].measured
    train = rows["training fwd+bwd at 4K >= 3x the peer"]
    assert train.status == "met" and "3.10x" in train.measured and "triton train" in train.measured
    assert rows["decode batch 1 at 128K >= 400 tok/s"].status == "met"          # the later run
    assert rows["a training step at 64K fits on one GPU"].status == "missing"   # an error is not a fit
    assert rows["prefill a 1M-token prompt on one GPU"].status == "missing"
    assert rows["decode batch 1 at 128K >= 400 tok/s"].measured.startswith("410")
    only_first = {r.target: r for r in targets.e2e_rows(targets.load_runs([first]))}
    assert only_first["decode batch 1 at 128K >= 400 tok/s"].status == "not met"


def test_kernel_bandwidth_rows():
    kernels = {"ceilings": {"copy_gbps": 1000.0},
               "attention": [{"case": "CSA decode b64", "S": 1, "B": 64, "triton_gbps": 750.0, "frac_copy_bw": 0.75},
                             {"case": "CSA prefill", "S": 4096, "B": 1, "triton_gbps": 10.0, "frac_copy_bw": 0.01}],
               "indexer": [{"case": "indexer decode b64", "S": 1, "B": 64, "scores_gbps": 500.0, "frac_copy_bw": 0.5}]}
    rows = targets.kernel_rows(kernels)
    assert [(r.target.split(":")[0], r.status) for r in rows] == [("CSA decode b64", "met"),
                                                                  ("indexer decode b64", "not met")]
    assert targets.table(rows).count("\n") == len(rows) + 1


def test_kernel_rows_of_several_runs_take_each_case_from_the_last_run_that_has_it(tmp_path):
    def run(name, indexer_frac, attention):
        path = tmp_path / name
        path.write_text(json.dumps({"ceilings": {"copy_gbps": 1000.0}, "attention": attention, "indexer": [
            {"case": "indexer decode b64", "S": 1, "B": 64, "scores_gbps": 1000 * indexer_frac,
             "frac_copy_bw": indexer_frac}]}))
        return str(path)
    csa = [{"case": "CSA decode b64", "S": 1, "B": 64, "triton_gbps": 300.0, "frac_copy_bw": 0.3}]
    rows = targets.latest_kernel_rows([run("old.json", 0.5, csa), run("new.json", 0.8, [])])
    assert [(r.target.split(":")[0], r.status) for r in rows] == [("CSA decode b64", "not met"),
                                                                  ("indexer decode b64", "met")]


def test_scores_are_measured_over_target_and_plot(tmp_path):
    run = _write(tmp_path, "a.json", [
        {"name": "dsv4 prefill", "tokens": 8192, "tok_per_s": 120.0, "seconds": 1, "peak_gb": 1},
        {"name": "transformers prefill", "tokens": 8192, "tok_per_s": 10.0, "seconds": 1, "peak_gb": 1},
        {"name": "dsv4 decode b1", "context": 131072, "tok_per_s": 200.0, "ms_per_step": 5, "peak_gb": 1}])
    rows = {r.target: r for r in targets.e2e_rows(targets.load_runs([run]))}
    assert abs(rows["prefill 8K >= 8x the peer"].score - 1.5) < 1e-9
    assert abs(rows["decode batch 1 at 128K >= 400 tok/s"].score - 0.5) < 1e-9
    assert rows["prefill a 1M-token prompt on one GPU"].score is None      # missing: not in the plot
    targets.plot(list(rows.values()), str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmarks_target_table_is_what_its_command_computes_from_the_raw_results():
    """BENCHMARKS.md's target table equals bench/targets.py's output for the files its command names."""
    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "BENCHMARKS.md"), encoding="utf-8") as f:
        text = f.read()
    command = re.search(r"```bash\n(python bench/targets\.py .*?)```", text, flags=re.S)
    assert command, "BENCHMARKS.md shows no `python bench/targets.py` command"
    args = shlex.split(command[1].replace("\\\n", " "))[2:]
    e2e = args[args.index("--e2e") + 1:args.index("--kernels")]
    kernels = [a for a in args[args.index("--kernels") + 1:] if a.endswith(".json")]
    rows = targets.e2e_rows(targets.load_runs([os.path.join(root, p) for p in e2e]))
    rows += targets.latest_kernel_rows([os.path.join(root, p) for p in kernels])
    assert all(r.status != "missing" for r in rows)
    assert targets.table(rows) in text
