"""Context parallelism (`torchrun -m dsv4.distributed.train --cp N`) on N GPUs with NCCL, in one call:

  exact     training steps (dense, indexer warm-up, sparse, sparse) of the tiny model in fp32 (TF32 off, the
            reference ops: DSV4_TRITON_TRAIN=0 DSV4_COMPILE=0) placed as `--cp N` places it (FSDP2, expert
            parallelism, each sequence split over the N ranks, balanced) against the same steps in one process on
            the same GPU (same seed, same data): the loss per step, the largest relative difference of the logits
            and of each gradient tensor per step, the latter beside its fp32 rounding noise (the one-process
            gradient's move when the embedding moves by 1e-7, as tests/distributed measure it);
  capacity  bench/e2e.py's benchmark model (bf16, Triton training kernels, block recompute, chunked loss) with each
            sequence split over the N GPUs, the model replicated ("cp"). First a check at --check-len tokens against
            one process on the same GPU (bf16: loss, lanes and gradients, beside the rounding noise of a
            one-process run whose embedding moved by half a bf16 step). Then training steps (forward + backward +
            the gradients' all-reduce; no optimizer, as bench/e2e.py times them) at --lengths, increasing until one
            fails (out of memory: the memory model predicts 118 GiB per GPU for 192K tokens on 2 GPUs): per length
            the step's seconds (the second step; the first one compiles kernels for the new shapes), each rank's
            peak memory (torch.cuda.max_memory_allocated) and the memory model's prediction beside it
            (dsv4.train.memory.step_memory, as bench/memory_model.py uses it);
  fsdp      the same steps at --fsdp-lengths with the `--cp` path's placement ("cp_fsdp": FSDP2 on fp32 weights,
            bf16 compute, expert parallelism; the memory model with 4-byte parameters sharded over the ranks).

    python bench/cp_gpu.py [--nproc N] [--out DIR]        # N: every GPU; results DIR/<date>_<device>_<commit>_cp_gpu.*
    python bench/cp_gpu.py --device cpu --nproc 2 --exact-seq 64 --check-len 128 --lengths 128 256 --fsdp-lengths 128

Each part is one torchrun of this file under a deadline (the call's --budget; the capacity part's leaves
--fsdp-reserve seconds to the fsdp part): a rank that fails (out of memory, a CUDA error) records what it was
doing and exits, the driver stops its peers (waiting in collectives), and the records written so far make the
result; a part still running at its deadline is killed. A length that would not finish before the deadline (its
time guessed from the last one's) is skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (the memory model on 2 GPUs, replicated bf16 weights: 30 GiB at 64K, 67 GiB at 128K, 118 GiB at 192K per GPU)
GPU_DEFAULTS = dict(exact_seq=1024, check_len=8192, lengths=[65536, 131072, 196608], fsdp_lengths=[65536, 131072])
CPU_DEFAULTS = dict(exact_seq=64, check_len=128, lengths=[128, 256], fsdp_lengths=[128])
STAGES = ("dense", "indexer", "sparse", "sparse")
PARTS = ("exact", "capacity", "fsdp")
EXACT_TOL = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# the ranks' side
# ---------------------------------------------------------------------------------------------------------------

class Records:
    """This rank's records of one part, one JSON line each, on disk as soon as written (the rank may die next)."""

    def __init__(self, folder: str, part: str, rank: int):
        self.f = open(os.path.join(folder, f"{part}-rank{rank}.jsonl"), "a")
        self.current: dict | None = None   # what the rank is doing (named in a failure record)
        self.t0 = time.time()

    def add(self, rec: dict) -> None:
        rec = {**rec, "t": round(time.time() - self.t0, 1)}      # seconds since the rank started its part
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        print(json.dumps(rec), flush=True)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference over the largest absolute value."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30))


def norm_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (bf16 comparisons: the max of a difference is one element's rounding luck)."""
    return float((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30))


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def worker(a: argparse.Namespace) -> None:
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    with open(os.path.join(a.parts_dir, f"{a.worker}-rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))    # (torchrun starts each rank in a session of its own: the driver kills by pid)
    threading.Thread(target=_exit_at, args=(a.deadline + 15,), daemon=True).start()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if a.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=timedelta(seconds=a.collective_timeout))
    from dsv4.distributed import init_distributed
    mesh = init_distributed()
    rec = Records(a.parts_dir, a.worker, rank)
    try:
        {"exact": part_exact, "capacity": part_capacity, "fsdp": part_fsdp}[a.worker](a, rank, world, mesh, device, rec)
    except BaseException as e:  # noqa: BLE001 - recorded, then this rank ends: its peers are stuck in collectives
        rec.add({"kind": "failure", "during": rec.current, "oom": isinstance(e, torch.OutOfMemoryError),
                 "error": f"{type(e).__name__}: {str(e)[:400]}"})
        import traceback
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)
    rec.add({"kind": "done"})
    dist.barrier()
    dist.destroy_process_group()


def _exit_at(when: float) -> None:
    """End this rank a little after the part's deadline, whatever it is doing or waiting for (the driver kills
    it at the deadline; this covers a driver that is gone)."""
    while time.time() < when:
        time.sleep(1)
    print("cp_gpu: past the deadline, exiting", flush=True)
    os._exit(4)


def part_exact(a, rank: int, world: int, mesh, device: torch.device, rec: Records) -> None:
    import dsv4
    from dsv4.distributed.parallelize import parallelize
    from dsv4.distributed.train import ContextParallelPlacement
    from dsv4.train.losses import LossWeights, compute_loss, expert_loads, update_expert_bias
    from dsv4.train.optim import build_optimizers
    from dsv4.train.placement import SingleProcess
    from dsv4.train.stages import set_stage
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = dsv4.ModelConfig.preset("tiny")
    T, stages = a.exact_seq, STAGES[:a.exact_steps]

    def batch(step: int) -> torch.Tensor:       # [2, T + 1 + n_mtp], the same on every rank
        g = torch.Generator().manual_seed(100 + step)
        return torch.randint(0, cfg.vocab_size, (2, T + 1 + cfg.n_mtp_layers), generator=g).to(device)

    def run(placement, model, rounding: float = 0.0) -> list[dict]:
        """The trainer's steps (dsv4.train.trainer, eager): loss, the gradients before clipping, the final norm's
        output (the logits' input) of each step."""
        if rounding:
            with torch.no_grad():
                g = torch.Generator().manual_seed(1)
                model.embed.weight.mul_(1 + rounding * torch.randn(model.embed.weight.shape, generator=g).to(device))
        captured: list[torch.Tensor] = []
        hook = model.norm.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
        opts = build_optimizers(model, 3e-3, muon_cls=placement.muon_cls)
        out = []
        for step, stage in enumerate(stages):
            set_stage(model, stage)
            captured.clear()
            loss, parts = compute_loss(model, placement.rows(batch(step)), LossWeights())
            loads = expert_loads(model)
            loss.backward()
            placement.finish_grads(model)
            grads = {n: full(p.grad).detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            head = full(model.head.weight).detach().double()
            logits = torch.nn.functional.linear(captured[0].double(), head)
            params = [p for p in model.parameters() if p.grad is not None]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
            if stage != "indexer":
                update_expert_bias(model, placement.reduce_loads(loads), 1e-3)
            out.append({"stage": stage, "loss": parts["loss"], "grad_norm": grad_norm, "grads": grads,
                        "logits": logits})
        hook.remove()
        return out

    def tiny() -> dsv4.Transformer:
        return dsv4.Transformer(cfg).init_weights(seed=0).to(device).train()

    rec.current = {"part": "exact", "run": "one process"}
    one = SingleProcess(device)
    want = run(one, tiny())
    noise = run(one, tiny(), rounding=1e-7)
    rec.current = {"part": "exact", "run": f"--cp {world}"}
    placement = ContextParallelPlacement(mesh, world)
    model = parallelize(tiny(), mesh, bf16=False).set_sequence_context(placement.context)   # fp32 throughout
    got = run(placement, model)
    at = placement.context.shard_positions(T, device)
    for step, (g, w, n) in enumerate(zip(got, want, noise)):
        errs = {name: (rel(g["grads"][name], w["grads"][name]), rel(n["grads"][name], w["grads"][name]))
                for name in w["grads"].keys() & g["grads"].keys()}
        worst = max(errs, key=lambda k: errs[k][0])
        flat = [torch.cat([d[k].flatten().double() for k in sorted(errs)]) for d in (g["grads"], w["grads"])]
        rec.add({"kind": "exact_step", "step": step, "stage": w["stage"], "seq_len": T, "loss_one": w["loss"],
                 "loss_cp": g["loss"], "loss_rel": abs(g["loss"] - w["loss"]) / abs(w["loss"]),
                 "loss_noise_rel": abs(n["loss"] - w["loss"]) / abs(w["loss"]),
                 "grad_norm_one": w["grad_norm"], "grad_norm_cp": g["grad_norm"],
                 "logits_rel": rel(g["logits"], w["logits"][:, at]), "logits_noise": rel(n["logits"], w["logits"]),
                 "grad_rel_all": norm_rel(flat[0], flat[1]),
                 "grad_rel_max": errs[worst][0], "grad_rel_max_tensor": worst, "grad_noise_of_worst": errs[worst][1],
                 "grad_beyond_noise": sorted(k for k, (e, nz) in errs.items() if e > max(EXACT_TOL, 10 * nz)),
                 "grads_missing": sorted(w["grads"].keys() - g["grads"].keys()),
                 "grads_extra": sorted(g["grads"].keys() - w["grads"].keys())})


class Capacity:
    """Training steps of one sequence split over the ranks at increasing lengths (part "capacity": the model
    replicated, after the check against one process; part "fsdp": the `--cp` placement)."""

    def __init__(self, a, world: int, device: torch.device, rec: Records):
        self.a, self.world, self.device, self.rec = a, world, device, rec
        self.cuda = device.type == "cuda"
        self.last: tuple[float, int] | None = None         # (seconds, length) of the last step timed
        self._tokens: dict[int, torch.Tensor] = {}
        torch.backends.cuda.matmul.allow_tf32 = True      # as `dsv4 train` and bench/e2e.py

    def build(self, fp32: bool):
        import dsv4
        torch.manual_seed(0)                              # the same weights on every rank
        if self.cuda:
            from e2e import build_model, flash4           # bench/e2e.py's benchmark model, bf16
            model = build_model(flash4())
            if fp32:
                model.to_dtype(torch.float32)
        else:                                             # (the CPU smoke run: the tiny model, fp32)
            model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=0)
        return model.train().set_activation_checkpointing(True)

    def tokens(self, model, T: int) -> torch.Tensor:
        """[1, T + 1 + n_mtp] (the MTP blocks' tokens: loss_terms takes them; their loss weighs 0)."""
        if T not in self._tokens:
            self._tokens.clear()
            g = torch.Generator().manual_seed(T)
            self._tokens[T] = torch.randint(0, model.config.vocab_size, (1, T + 1 + len(model.mtp)),
                                            generator=g).to(self.device)
        return self._tokens[T]

    def reduce_grads(self, model) -> None:
        """The replicated model's gradients: each rank holds world x its part of the mean loss's (every rank's
        loss is the whole sequence's; the exchanges' backward passes sum over ranks): the mean over ranks."""
        import torch.distributed as dist
        for p in model.parameters():
            if p.requires_grad:
                if p.grad is None:    # (not reached from this rank's loss: an expert no token chose, the indexer)
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(self.world)

    def step(self, model, T: int, placement=None) -> float:
        """Forward + backward of the LM loss on this rank's positions (the whole sequence's loss, as the
        trainer's loss_terms has it), then the gradients of the mean loss on every rank."""
        from dsv4.train.losses import LossWeights, loss_terms
        model.zero_grad(set_to_none=True)
        loss, _ = loss_terms(model, self.tokens(model, T), LossWeights(mtp=0.0, indexer_kl=0.0, balance=0.0))
        loss.backward()
        if placement is not None:
            placement.finish_grads(model)
        else:
            self.reduce_grads(model)
        return float(loss.detach())

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def check(self, model, ctx) -> None:
        """CP against one process on this GPU at --check-len tokens (the replicated model, bf16 on GPUs), beside
        the rounding noise: the one-process run again with the embedding moved by half a bf16 step."""
        from dsv4.train.losses import lm_loss
        T, device = self.a.check_len, self.device
        self.rec.current = {"part": "capacity", "run": "check", "seq_len": T}
        t0 = self.now()

        def forward_backward() -> tuple[float, torch.Tensor, dict]:
            """(loss, the lanes, the gradients) of the whole sequence in one process (no sequence context) or of
            this rank's positions (then the gradients are the mean over ranks)."""
            model.zero_grad(set_to_none=True)
            at = torch.arange(T, device=device) if model.sequence_context is None else ctx.shard_positions(T, device)
            tokens = self.tokens(model, T)
            h = model.hidden(tokens[:, at])
            loss = lm_loss(model, h, tokens[:, at + 1])
            if model.sequence_context is not None:        # as loss_terms: weighted by the ranks' positions
                n = torch.full_like(loss, len(at))
                loss = ctx.sum(loss * n) / ctx.sum(n)
            loss.backward()
            if model.sequence_context is not None:
                self.reduce_grads(model)
            return float(loss.detach()), h.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                             if p.grad is not None}
        model.set_sequence_context(None)
        loss_one, h_one, g_one = forward_backward()
        embed = model.embed.weight.detach().clone()
        with torch.no_grad():   # half a bf16 step (2^-9 relative) before rounding: about a third of the entries move
            g = torch.Generator().manual_seed(1)
            bump = torch.randn(embed.shape, generator=g).to(device) * (2**-9 if embed.dtype == torch.bfloat16 else 1e-7)
            model.embed.weight.copy_((embed.float() * (1 + bump)).to(embed.dtype))
            del bump
        loss_noise, h_noise, g_noise = forward_backward()
        with torch.no_grad():
            model.embed.weight.copy_(embed)
        del embed
        model.set_sequence_context(ctx)
        loss_cp, h_cp, g_cp = forward_backward()
        at = ctx.shard_positions(T, device)
        names = sorted(g_one)
        per = {n: (norm_rel(g_cp[n], g_one[n]), norm_rel(g_noise[n], g_one[n])) for n in names
               if n in g_cp and g_one[n].any()}
        worst = max(per, key=lambda k: per[k][0])

        def global_rel(gs: dict) -> float:
            num = sum(float((gs[n].float() - g_one[n].float()).pow(2).sum()) for n in names if n in gs)
            return (num / sum(float(g_one[n].float().pow(2).sum()) for n in names)) ** 0.5
        self.rec.add({"kind": "check", "seq_len": T, "loss_one": loss_one, "loss_cp": loss_cp,
                      "loss_noise": loss_noise, "loss_rel": abs(loss_cp - loss_one) / abs(loss_one),
                      "loss_noise_rel": abs(loss_noise - loss_one) / abs(loss_one),
                      "lanes_rel": norm_rel(h_cp, h_one[:, at]), "lanes_noise_rel": norm_rel(h_noise, h_one),
                      "grad_rel": global_rel(g_cp), "grad_noise_rel": global_rel(g_noise),
                      "grad_rel_worst_tensor": worst, "grad_rel_worst": per[worst][0],
                      "grad_noise_of_worst": per[worst][1], "grads_missing": sorted(set(names) - g_cp.keys()),
                      "seconds": self.now() - t0})
        model.zero_grad(set_to_none=True)

    def agreed(self, go: bool) -> bool:
        """Rank 0's decision on every rank (the clocks and step times differ a little between ranks)."""
        import torch.distributed as dist
        t = torch.tensor([float(go)], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def measure(self, model, ctx, variant: str, T: int, placement=None) -> None:
        """Two steps at T tokens (the first compiles and tunes kernels for the new shapes), the second timed,
        unless the first took past --length-cap or the deadline is near; skipped when the step would not finish
        before the deadline (its time guessed from the last one's, quadratic in the length: a bound)."""
        import torch.distributed as dist
        from dsv4.train.memory import step_memory
        a, rec = self.a, self.rec
        guess = 30.0 if self.last is None else 2 * self.last[0] * (T / self.last[1]) ** 2 + 5
        if not self.agreed(time.time() + guess < a.deadline):
            rec.add({"kind": "skip", "variant": variant, "seq_len": T,
                     "why": f"~{guess:.0f} s would pass the deadline"})
            return
        fsdp = placement is not None
        pred = step_memory(model.config, T, cp=self.world, shards=self.world if fsdp else 1,
                           param_bytes=4 if fsdp else 2, optimizer=None, recompute=True)
        rec.current = {"part": a.worker, "variant": variant, "seq_len": T}
        rec.add({"kind": "start", **rec.current, "predicted_gib": pred.total / 2**30, "predicted_phase": pred.phase})
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = self.now()
        loss = self.step(model, T, placement)
        first = self.now() - t0
        timed = None
        if self.agreed(first < a.length_cap and time.time() + first + 5 < a.deadline):
            t0 = self.now()
            loss = self.step(model, T, placement)
            timed = self.now() - t0
        secs = torch.tensor([timed or first], device=self.device)
        dist.all_reduce(secs, op=dist.ReduceOp.MAX)
        self.last = (float(secs), T)
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None
        rec.add({"kind": "run", "variant": variant, "seq_len": T, "local_tokens": ctx.local_len(T), "loss": loss,
                 "first_step_s": first, "step_s": timed, "step_s_max_over_ranks": float(secs),
                 "tok_per_s": T / float(secs), "peak_gib": peak,
                 "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if self.cuda else None,
                 "predicted_gib": pred.total / 2**30, "predicted_phase": pred.phase,
                 "measured_over_predicted": peak / (pred.total / 2**30) if self.cuda else None})
        model.zero_grad(set_to_none=True)


def part_capacity(a, rank: int, world: int, mesh, device: torch.device, rec: Records) -> None:
    """The check, then --lengths with the model replicated on every rank (gradients all-reduced)."""
    from dsv4.distributed import ContextParallel
    run = Capacity(a, world, device, rec)
    model = run.build(fp32=False)
    ctx = ContextParallel(balanced=True)
    run.check(model, ctx)
    for T in a.lengths:
        run.measure(model, ctx, "cp", T)


def part_fsdp(a, rank: int, world: int, mesh, device: torch.device, rec: Records) -> None:
    """--fsdp-lengths with the `--cp` path's placement: FSDP2 over the ranks (fp32 weights, bf16 compute on
    GPUs), experts expert-parallel, each sequence split over the ranks."""
    from dsv4.distributed.train import ContextParallelPlacement
    run = Capacity(a, world, device, rec)
    rec.current = {"part": "fsdp", "run": "placing the model"}
    placement = ContextParallelPlacement(mesh, world)
    model = placement.place(run.build(fp32=True))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for T in a.fsdp_lengths:
        run.measure(model, placement.context, "cp_fsdp", T, placement)


# ---------------------------------------------------------------------------------------------------------------
# the driver: one torchrun per part, under the deadline
# ---------------------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_records(folder: str, part: str, world: int) -> list[list[dict]]:
    out = []
    for r in range(world):
        path = os.path.join(folder, f"{part}-rank{r}.jsonl")
        rows = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:      # a line cut short by a dying rank
                        pass
        out.append(rows)
    return out


def stop(proc: subprocess.Popen, folder: str, part: str, nproc: int) -> None:
    """Kill the part's ranks (by the pids they wrote, each still running this file) and then torchrun."""
    for r in range(nproc):
        try:
            with open(os.path.join(folder, f"{part}-rank{r}.pid")) as f:
                pid = int(f.read())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if os.path.basename(__file__).encode() not in f.read():
                    continue
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            pass


_RUNNING: list = []     # the part now running: (torchrun, folder, part, ranks), for stopping it on SIGTERM


def _on_sigterm(signum, frame) -> None:
    for running in _RUNNING:
        stop(*running)
    sys.exit(128 + signum)


def launch(a, part: str, folder: str, deadline: float, extra: list[str], env: dict) -> dict:
    """torchrun of this file's `part` on a.nproc ranks, killed at the deadline, a few seconds after one rank
    records a failure (its peers wait in collectives), or 20 s after every rank is done (a hung teardown)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), os.path.abspath(__file__),
           "--worker", part, "--device", a.device, "--parts-dir", folder, "--deadline", str(deadline),
           "--collective-timeout", str(a.collective_timeout), *extra]
    log_path = os.path.join(folder, f"{part}.log")
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        _RUNNING[:] = [(proc, folder, part, a.nproc)]
        ended, since = None, None
        while proc.poll() is None:
            time.sleep(0.5)
            recs = read_records(folder, part, a.nproc)
            failed = any(r.get("kind") == "failure" for rows in recs for r in rows)
            done = all(any(r.get("kind") == "done" for r in rows) for rows in recs)
            if (failed or done) and since is None:
                since = time.time()
            grace = 5 if failed else 20
            if time.time() > deadline + 10 or (since is not None and time.time() - since > grace):
                ended = "killed at the deadline" if since is None else (
                    "killed after a rank's failure" if failed else "killed in teardown, after every rank was done")
                stop(proc, folder, part, a.nproc)
                break
    proc.wait()
    _RUNNING.clear()
    with open(log_path) as f:
        tail = f.read()[-3000:]
    print(f"--- {part}: rc {proc.returncode}, {time.time() - t0:.0f} s{', ' + ended if ended else ''}\n{tail}",
          flush=True)
    return {"rc": proc.returncode, "seconds": time.time() - t0, "ended": ended, "log_tail": tail,
            "records": read_records(folder, part, a.nproc)}


def merge_exact(res: dict) -> dict:
    """The ranks' step records as one per step: logits from each rank's positions (the max over ranks); the
    losses and whole gradients are every rank's."""
    steps = {}
    for rows in res["records"]:
        for r in rows:
            if r.get("kind") == "exact_step":
                s = steps.setdefault(r["step"], dict(r))
                s["logits_rel"] = max(s["logits_rel"], r["logits_rel"])
    steps = [steps[k] for k in sorted(steps)]
    out = {"steps": steps, "failures": _failures(res), "rc": res["rc"], "ended": res["ended"],
           "seconds": res["seconds"]}
    if steps:
        out.update({"loss_rel_max": max(s["loss_rel"] for s in steps),
                    "logits_rel_max": max(s["logits_rel"] for s in steps),
                    "grad_rel_all_max": max(s["grad_rel_all"] for s in steps),
                    "grad_rel_max": max(s["grad_rel_max"] for s in steps),
                    # (after an optimizer step the runs' parameters differ by the amplified rounding of the first
                    # step's updates: later steps compare with the one-process run moved by rounding, [noise])
                    "grad_beyond_noise_step0": steps[0]["grad_beyond_noise"],
                    "later_steps_within_10x_noise": all(
                        s["loss_rel"] <= max(EXACT_TOL, 10 * s["loss_noise_rel"])
                        and s["logits_rel"] <= max(EXACT_TOL, 10 * s["logits_noise"]) for s in steps[1:]),
                    "first_step": {k: steps[0][k] for k in ("logits_rel", "grad_rel_all", "grad_rel_max",
                                                             "grad_rel_max_tensor", "grad_noise_of_worst")}})
    if res["rc"] != 0 or not steps:
        out["log_tail"] = res["log_tail"]
    return out


def merge_capacity(res: dict, planned: list[tuple[str, int]]) -> dict:
    by_rank = res["records"]
    checks = [r for rows in by_rank for r in rows if r.get("kind") == "check"]   # (the lanes: each rank's positions)
    check = dict(checks[0], lanes_rel=max(c["lanes_rel"] for c in checks)) if checks else None
    runs = []
    for variant, T in planned:
        mine = [[r for r in rows if r.get("variant") == variant and r.get("seq_len") == T] for rows in by_rank]
        done = [next((r for r in rs if r["kind"] == "run"), None) for rs in mine]
        fail = [r for rows in by_rank for r in rows if r.get("kind") == "failure" and r.get("during")
                and r["during"].get("variant") == variant and r["during"].get("seq_len") == T]
        skip = next((r for rs in mine for r in rs if r["kind"] == "skip"), None)
        start = next((r for rs in mine for r in rs if r["kind"] == "start"), {})
        row = {"variant": variant, "seq_len": T, "predicted_gib": start.get("predicted_gib"),
               "predicted_phase": start.get("predicted_phase")}
        if all(done):
            d0 = done[0]
            row.update({k: d0[k] for k in ("local_tokens", "loss", "step_s_max_over_ranks", "tok_per_s",
                                           "predicted_gib", "predicted_phase")})
            row["step_s"] = row.pop("step_s_max_over_ranks")
            row["warm"] = all(d["step_s"] is not None for d in done)
            row["first_step_s"] = max(d["first_step_s"] for d in done)
            peaks = [d["peak_gib"] for d in done]
            row["peak_gib_per_rank"] = peaks
            if None not in peaks:
                row["peak_gib"] = max(peaks)
                row["measured_over_predicted"] = max(peaks) / d0["predicted_gib"]
                row["reserved_gib"] = max(d["reserved_gib"] for d in done)
            row["status"] = "ok"
        elif fail:
            row["status"] = "out of memory" if any(f["oom"] for f in fail) else "failed"
            row["error"] = fail[0]["error"]
        elif skip:
            row["status"], row["error"] = "skipped", skip["why"]
        elif start:
            row["status"] = f"no result ({res['ended'] or 'rc ' + str(res['rc'])})"
        else:
            row["status"] = "not run"
        runs.append(row)
    out = {"check": check, "runs": runs, "failures": _failures(res), "rc": res["rc"], "ended": res["ended"],
           "seconds": res["seconds"]}
    if res["rc"] != 0 or check is None:
        out["log_tail"] = res["log_tail"]
    return out


def _failures(res: dict) -> list[dict]:
    return [dict(r, rank=i) for i, rows in enumerate(res["records"]) for r in rows if r.get("kind") == "failure"]


def table(result: dict) -> str:
    lines = [f"context parallelism on {result['nproc']} x {result['device']} ({result['backend']}), "
             f"commit {result['commit']}, {result['wall_s']:.0f} s"]
    ex = result["parts"].get("exact")
    if ex is not None:
        lines.append(f"\nexact: tiny model fp32, {len(ex['steps'])} training steps, --cp {result['nproc']} "
                     f"(FSDP2 + EP) vs one process on the same device")
        lines.append("relative differences, cp vs one process [the one process moved by 1e-7 fp32 rounding]")
        lines.append(f"{'step':>4} {'stage':<8}{'loss one':>11}{'loss cp':>11}{'loss':>18}{'logits':>18}"
                     f"{'all grads':>10}  worst gradient tensor")
        for s in ex["steps"]:
            lines.append(f"{s['step']:>4} {s['stage']:<8}{s['loss_one']:>11.6f}{s['loss_cp']:>11.6f}"
                         f"{s['loss_rel']:>9.1e} [{s['loss_noise_rel']:.1e}]{s['logits_rel']:>9.1e} "
                         f"[{s['logits_noise']:.1e}]{s['grad_rel_all']:>10.1e}  {s['grad_rel_max']:.1e} "
                         f"[{s['grad_noise_of_worst']:.1e}] {s['grad_rel_max_tensor']}")
        if ex["steps"]:
            lines.append(f"first step, gradient tensors beyond max(1e-5, 10 x noise): "
                         f"{ex['grad_beyond_noise_step0'] or 'none'}; later steps' loss and logits within 10 x noise: "
                         f"{ex['later_steps_within_10x_noise']}")
        for f in ex["failures"]:
            lines.append(f"rank {f['rank']} failed: {f['error']}")
    cap, fsdp = result["parts"].get("capacity"), result["parts"].get("fsdp")
    if cap is not None and cap["check"]:
        c = cap["check"]
        model = "benchmark model, bf16" if result["backend"] == "nccl" else "tiny model, fp32"
        lines.append(f"\ncheck at {c['seq_len']} tokens ({model}), cp vs one process "
                     f"[rounding noise]: loss {c['loss_rel']:.1e} [{c['loss_noise_rel']:.1e}], lanes "
                     f"{c['lanes_rel']:.1e} [{c['lanes_noise_rel']:.1e}], gradients {c['grad_rel']:.1e} "
                     f"[{c['grad_noise_rel']:.1e}]")
    if cap is not None or fsdp is not None:
        lines.append(f"\n{'variant':<9}{'tokens':>8}{'per rank':>10}{'step s':>8}{'tok/s':>9}{'peak GiB':>10}"
                     f"{'model GiB':>11}{'ratio':>7}{'loss':>9}  status")
    for part in (cap, fsdp):
        if part is None:
            continue
        for r in part["runs"]:
            if r["status"] == "ok":
                peak = r.get("peak_gib")
                lines.append(f"{r['variant']:<9}{r['seq_len']:>8}{r['local_tokens']:>10}{r['step_s']:>8.2f}"
                             f"{r['tok_per_s']:>9.0f}{peak if peak is not None else float('nan'):>10.1f}"
                             f"{r['predicted_gib']:>11.1f}{r.get('measured_over_predicted', float('nan')):>7.2f}"
                             f"{r['loss']:>9.4f}  ok{'' if r['warm'] else ' (first step only)'}")
            else:
                pred = f"{r['predicted_gib']:.1f}" if r.get("predicted_gib") is not None else ""
                lines.append(f"{r['variant']:<9}{r['seq_len']:>8}{'':>45}{pred:>11}{'':>16}  {r['status']}"
                             f"{': ' + r['error'][:100] if r.get('error') else ''}")
        for f in part["failures"]:
            lines.append(f"rank {f['rank']} failed during {f['during']}: {f['error'][:300]}")
    lines.append("\nparts: " + "; ".join(
        f"{name} {p['seconds']:.0f} s, rc {p['rc']}{', ' + p['ended'] if p['ended'] else ''}"
        for name, p in result["parts"].items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, help="ranks (default: every GPU; 2 on the CPU)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="results folder (default: $DSV4_RESULTS_DIR or bench/results)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--budget", type=float, default=225, help="seconds for the whole call (kills what runs past it)")
    p.add_argument("--fsdp-reserve", type=float, default=60, help="seconds of the budget kept for the fsdp part")
    p.add_argument("--exact-seq", type=int, help="tokens per sequence of the exactness steps")
    p.add_argument("--exact-steps", type=int, default=len(STAGES), choices=range(1, len(STAGES) + 1))
    p.add_argument("--check-len", type=int, help="tokens of the bf16 check against one process")
    p.add_argument("--lengths", type=int, nargs="*", help="sequence lengths, the model replicated")
    p.add_argument("--fsdp-lengths", type=int, nargs="*", help="sequence lengths, FSDP2 (the --cp placement)")
    p.add_argument("--length-cap", type=float, default=60,
                   help="seconds: a length whose first step takes longer is not timed again")
    p.add_argument("--collective-timeout", type=float, default=180)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--parts-dir", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for k, v in (GPU_DEFAULTS if a.device == "cuda" else CPU_DEFAULTS).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.worker:
        worker(a)
        return 0
    a.nproc = a.nproc or (torch.cuda.device_count() if a.device == "cuda" else 2)
    if a.nproc < 1 or (a.device == "cuda" and a.nproc > torch.cuda.device_count()):
        p.error(f"--nproc {a.nproc}: this machine has {torch.cuda.device_count()} GPUs")
    t_start = time.time()
    deadline = t_start + a.budget
    signal.signal(signal.SIGTERM, _on_sigterm)      # (`timeout` in bench/gpu_session.sh: the ranks go too)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(x for x in (REPO, os.environ.get("PYTHONPATH")) if x),
               NCCL_NVLS_ENABLE=os.environ.get("NCCL_NVLS_ENABLE", "0"),
               TORCH_SYMM_MEM_DISABLE_MULTICAST=os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"))
    if a.device == "cpu":
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    parts = {}
    with tempfile.TemporaryDirectory(prefix="cp_gpu_") as folder:
        if "exact" in a.parts:      # (seconds: the tiny model's steps; the rest is for the capacity part)
            exact_deadline = min(deadline, time.time() + max(60.0, 0.3 * a.budget))
            res = launch(a, "exact", folder, exact_deadline, ["--exact-seq", str(a.exact_seq), "--exact-steps",
                                                              str(a.exact_steps)],
                         dict(env, DSV4_TRITON_TRAIN="0", DSV4_COMPILE="0"))
            parts["exact"] = merge_exact(res)
        lengths = ["--check-len", str(a.check_len), "--length-cap", str(a.length_cap),
                   "--lengths", *map(str, a.lengths), "--fsdp-lengths", *map(str, a.fsdp_lengths)]
        fsdp = "fsdp" in a.parts and a.fsdp_lengths
        if "capacity" in a.parts:   # (leaving --fsdp-reserve seconds to the FSDP part's launch)
            res = launch(a, "capacity", folder, deadline - (a.fsdp_reserve if fsdp else 0), lengths, env)
            parts["capacity"] = merge_capacity(res, [("cp", T) for T in a.lengths])
        if fsdp:
            res = launch(a, "fsdp", folder, deadline, lengths, env)
            parts["fsdp"] = merge_capacity(res, [("cp_fsdp", T) for T in a.fsdp_lengths])
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from provenance import record, result_path            # bench/provenance.py
    result = {**record(a.device), "torch": torch.__version__, "nproc": a.nproc,
              "backend": "nccl" if a.device == "cuda" else "gloo", "wall_s": time.time() - t_start,
              "args": {k: v for k, v in vars(a).items() if k not in ("worker", "parts_dir", "deadline")},
              "parts": parts}
    path = result_path("cp_gpu", "json", device=a.device, folder=a.out)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    text = table(result)
    with open(path[:-len(".json")] + ".txt", "w") as f:
        f.write(text)
    print(text + f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
