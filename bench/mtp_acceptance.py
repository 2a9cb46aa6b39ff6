"""How often MTP drafts are accepted at each draft position, and what that projects for the speed-up.

Greedy speculative decoding (dsv4.generate.speculative.SpeculativeDecoder, one row at a time: a lone greedy
stream's fused step, pipelined by `greedy_row_stream` with CUDA graphs on a GPU; `--step-loop`: the eager
`step_row` loop, the same steps) with n_draft = 1 .. K from several prompts (evenly spaced windows of a text file),
and per n_draft:

  - tokens per step (mean): 1 + the drafts accepted;
  - acceptance at draft position j: P(draft j accepted | drafts 1 .. j-1 accepted), over the steps that made a j-th
    draft (a step near the token budget, or after a drafted stop token, drafts fewer); later drafts feed the MTP
    block its own output lanes in place of the main model's, so they may accept less than the first;
  - overall acceptance: accepted / drafted;
  - projected speed-up over plain decoding: tokens per step / (cost of a k-draft step relative to a plain step).

Every n_draft's output is checked against plain greedy decoding (dsv4.generate) token for token: speculative
decoding must not change a greedy output beyond rounding. A verify forward over 1 + k tokens sums in other orders
than a one-token decode step (other GEMM shapes; the window attention reads its keys newest first in a multi-token
forward, oldest first in a decode step), so in bf16 the two can flip a near-tie of the two best tokens. Each
mismatch is diagnosed at its first differing token (bench/greedy_ties.py): plain's logits there recomputed by one
full forward over the prompt and the common prefix, in the run's dtype and, for a bf16 model, in float32 (a
float32 copy of the model), and the speculative decoder's own logits there; for plain's and speculative's tokens
each gives their logits, the gap, the gap relative to the largest |logit| and in ulps of the model's dtype there.
A mismatch whose gap is within `--tie-ulps` ulps (default 4) in either computation is a "near-tie (rounding)":
printed and counted, not a failure; otherwise it is "not a tie" and the script exits with status 1. A rounding
difference can also flip a discrete choice upstream (the indexer's top-k, the router's experts) and move the
logits by more than a few ulps; the float32 line and the bf16 against float32 deviation show whether plain's
token is the one float32 prefers.

`--batch-invariant` runs plain and speculative decoding inside `dsv4.ops.batch_invariant()`, and then every
mismatch fails. The mode makes a row's arithmetic independent of the other rows of its batch (CUDA tensors only;
on the CPU it changes nothing); it does not make a 1 + k-token forward equal k + 1 one-token forwards: with its
kernels forced onto the CPU (Triton's interpreter, float32, tiny preset) a 4-token forward's logits differ from
four one-token forwards' by ~2e-7 from the first position on, the window attention's key order being one cause.
So a failure under the mode whose diagnosis says "near-tie" is that difference, not a logic error.

Step costs (`--step-cost K:RATIO ...`, the cost of a K-draft step over a plain step) default to GPU measurements on
the `small` preset in BENCHMARKS.md: n_draft 1, 1.81 (one CUDA graph, 2.68 against 1.48 ms, H200); n_draft 3, 1.75
(the GPU work alone, 2.61 against 1.50 ms, H100; the timed step with its host work was 2.56). They depend on the
device, model and code, so pass your own; an n_draft with no cost gets no projection.

    python bench/mtp_acceptance.py --checkpoint runs/small/final --text path/to/file.py
    python bench/mtp_acceptance.py --checkpoint CKPT --text FILE --n-draft 1 2 3 4 --prompts 8 --prompt-len 512 \\
        --max-new 256 --step-cost 1:1.81 2:1.78 3:1.75
    python bench/mtp_acceptance.py --checkpoint CKPT --text FILE --n-draft 1 2 3 --prompts 6 --prompt-len 512 \\
        --max-new 192 --batch-invariant
    python bench/mtp_acceptance.py --tiny-cpu          # tiny preset, random weights, no checkpoint: a smoke run

The result goes to bench/results/<date>_<device>_<commit>_mtp_acceptance.txt (bench/provenance.py; --out names
another file).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dsv4  # noqa: E402
from dsv4.generate import SamplingConfig  # noqa: E402
from dsv4.generate.speculative import SpeculativeDecoder  # noqa: E402
from greedy_ties import TIE_ULPS, Diagnosis, PositionDiagnosis  # noqa: E402

GREEDY = SamplingConfig(temperature=0.0)
# cost of a k-draft step over a plain step, `small` on H100 / H200 (BENCHMARKS.md, MTP section)
DEFAULT_STEP_COST = {1: 1.81, 3: 1.75}


@dataclass
class Mismatch:
    """A speculative output that differs from plain greedy decoding's: where, the two tokens there (None past an
    output's end), and the diagnosis of that position (None when there are no two tokens to compare)."""
    prompt: int
    at: int
    lengths: tuple[int, int]                 # (speculative, plain)
    tokens: tuple[int | None, int | None]    # (speculative's, plain's) at `at`
    diagnosis: PositionDiagnosis | None = None

    @property
    def tie(self) -> bool:
        return self.diagnosis is not None and self.diagnosis.tie

    @property
    def verdict(self) -> str:
        return "near-tie (rounding)" if self.tie else "not a tie"

    def lines(self) -> list[str]:
        head = (f"prompt {self.prompt}: differs from plain greedy at token {self.at} (lengths {self.lengths[0]} vs "
                f"{self.lengths[1]}): plain {self.tokens[1]}, speculative {self.tokens[0]} -> {self.verdict}")
        return [head] + (["    " + x for x in self.diagnosis.lines()] if self.diagnosis else [])


@dataclass
class Counts:
    """One n_draft's tallies over all prompts. tried[j] / accepted[j]: steps that made a (j+1)-th draft after
    accepting the j before it, and steps that accepted it."""
    n_draft: int
    steps: int = 0
    tokens: int = 0
    drafted: int = 0
    accepted_total: int = 0
    tried: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)

    def __post_init__(self):
        self.tried = self.tried or [0] * self.n_draft
        self.accepted = self.accepted or [0] * self.n_draft

    def add_step(self, n_tokens: int, drafted: int, accepted: int) -> None:
        self.steps += 1
        self.tokens += n_tokens
        self.drafted += drafted
        self.accepted_total += accepted
        for j in range(drafted):
            if accepted >= j:          # drafts 1 .. j were accepted, so draft j+1 was tried
                self.tried[j] += 1
                self.accepted[j] += accepted > j

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / max(self.steps, 1)

    @property
    def acceptance(self) -> float:
        return self.accepted_total / max(self.drafted, 1)

    def position_acceptance(self) -> list[float | None]:
        return [a / t if t else None for a, t in zip(self.accepted, self.tried)]


@torch.no_grad()
def speculative_greedy(model, prompt: list[int], max_new: int, n_draft: int, counts: Counts,
                       logits: list[torch.Tensor] | None = None, pipelined: bool = True) -> list[int]:
    """Greedy speculative decoding of one prompt for max_new tokens, tallying each step into `counts` (and, given
    `logits`, appending the logits [vocab] each token was chosen from). `pipelined`: the decoder's
    greedy_row_stream (each step launched before the last one's results are read; CUDA graphs on a GPU), else
    the step_row loop (eager); both give the same steps."""
    room = len(prompt) + max_new + 2 * (n_draft + 1) + 2   # (the stream launches ahead while two steps fit)
    dec = SpeculativeDecoder(model, model.new_cache(1, room), n_draft=n_draft)
    dec.prefill(0, prompt)
    out: list[int] = []
    drafted, accepted = counts.drafted, counts.accepted_total
    stream = dec.greedy_row_stream(0, max_new) if pipelined else None
    while len(out) < max_new:
        res = next(stream) if pipelined else dec.step_row(0, GREEDY, None, (), max_new - len(out))
        if len(res.tokens) != 1 + res.accepted or not 0 <= res.accepted <= res.drafted <= n_draft:
            raise AssertionError(f"step emitted {len(res.tokens)} tokens with {res.accepted} of {res.drafted} "
                                 f"drafts accepted (n_draft {n_draft})")
        counts.add_step(len(res.tokens), res.drafted, res.accepted)
        out += res.tokens
        if logits is not None:
            logits += list(res.logits.clone())
        if res.finished:
            break
    mine = (counts.drafted - drafted, counts.accepted_total - accepted)
    if mine != (dec.stats["drafted"], dec.stats["accepted"]):   # the decoder's own tally must agree
        raise AssertionError(f"decoder stats {dec.stats} against the steps' drafted, accepted {mine}")
    return out


def measure(model, prompts: list[list[int]], max_new: int, n_drafts: list[int],
            plain: list[list[int]] | None = None, diagnose: Diagnosis | None = None,
            pipelined: bool = True) -> tuple[list[Counts], list[list[int]]]:
    """Per n_draft its Counts (with any mismatch against plain greedy decoding, diagnosed by `diagnose` where
    given), and the plain outputs (computed unless given). `pipelined`: as in speculative_greedy."""
    if plain is None:
        plain = [dsv4.generate(model, [p], max_new)[0] for p in prompts]
    results = []
    for k in n_drafts:
        c = Counts(k)
        for i, (p, ref) in enumerate(zip(prompts, plain)):
            chosen_from: list[torch.Tensor] = []
            got = speculative_greedy(model, p, max_new, k, c, chosen_from if diagnose else None, pipelined)
            if got != ref:
                c.mismatches.append(mismatch(i, p, got, ref, diagnose, chosen_from))
        results.append(c)
    return results, plain


def mismatch(i: int, prompt: list[int], got: list[int], ref: list[int], diagnose: Diagnosis | None,
             chosen_from: list[torch.Tensor] = ()) -> Mismatch:
    """Prompt i's speculative output `got` against plain greedy's `ref`, diagnosed at the first differing token:
    plain's logits there recomputed (prompt + the common prefix), and the speculative decoder's own logits
    (`chosen_from`, one per token of `got`, where kept), the two tokens' gap classified in each."""
    at = next((t for t, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    tokens = (got[at] if at < len(got) else None, ref[at] if at < len(ref) else None)
    m = Mismatch(i, at, (len(got), len(ref)), tokens)
    if diagnose is not None and None not in tokens:
        other = chosen_from[at] if at < len(chosen_from) else None
        m.diagnosis = diagnose(list(prompt) + ref[:at], tokens[1], tokens[0], other)
    return m


def failures(results: list[Counts], strict: bool) -> list[Mismatch]:
    """The mismatches that fail the run: every one when `strict`, else those that are not near-ties."""
    return [m for c in results for m in c.mismatches if strict or not m.tie]


def distinct_ngrams(outputs: list[list[int]], n: int = 4) -> float:
    """Distinct n-grams over all n-grams of the outputs: low when greedy output loops, which makes drafting easy
    (a weakly trained model's acceptance is inflated by its repetitions)."""
    grams = [tuple(o[i:i + n]) for o in outputs for i in range(len(o) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def parse_costs(items: list[str] | None) -> dict[int, float]:
    """['1:1.81', '3:1.75'] -> {1: 1.81, 3: 1.75}; None -> the defaults."""
    if items is None:
        return dict(DEFAULT_STEP_COST)
    costs = {}
    for item in items:
        k, _, r = item.partition(":")
        try:
            costs[int(k)] = float(r)
        except ValueError:
            raise SystemExit(f"--step-cost {item!r}: use K:RATIO, e.g. 3:1.75") from None
    return costs


def report(results: list[Counts], costs: dict[int, float], header: list[str], strict: bool = False) -> str:
    """The result table as text, with each mismatch, its diagnosis and the counts of each kind (`strict`: every
    mismatch fails the run, near-tie or not)."""
    K = max(c.n_draft for c in results)
    lines = list(header)
    cols = ["n_draft", "steps", "tokens/step", "accept"] + [f"acc@{j + 1}" for j in range(K)] + ["cost", "speed-up"]
    lines.append(" | ".join(cols))
    for c in results:
        pos = c.position_acceptance()
        cells = [str(c.n_draft), str(c.steps), f"{c.tokens_per_step:.3f}", f"{c.acceptance:.3f}"]
        cells += [("-" if j >= len(pos) or pos[j] is None else f"{pos[j]:.3f}") for j in range(K)]
        cost = costs.get(c.n_draft)
        cells += [f"{cost:.2f}" if cost else "-", f"{c.tokens_per_step / cost:.2f}x" if cost else "-"]
        lines.append(" | ".join(cells))
    lines.append("")
    lines.append("per position (accepted / tried):")
    for c in results:
        lines.append(f"  n_draft {c.n_draft}: " + ", ".join(f"{a}/{t}" for a, t in zip(c.accepted, c.tried)))
    every = [m for c in results for m in c.mismatches]
    lines.append("")
    if every:
        lines.append("GREEDY OUTPUT MISMATCH (speculative decoding changed the output):")
        for c in results:
            for m in c.mismatches:
                first, *rest = m.lines()
                lines += [f"  n_draft {c.n_draft}: {first}"] + [f"  {x}" for x in rest]
        ties = sum(m.tie for m in every)
        failed = len(failures(results, strict))
        lines.append(f"mismatches: {len(every)}, near-tie (rounding) {ties}, not a tie {len(every) - ties}; "
                     f"failing: {failed}" + (" (batch-invariant: every mismatch fails)" if strict else
                                             " (a near-tie flip is counted, not a failure)"))
    else:
        lines.append("greedy output equals plain greedy decoding for every n_draft and prompt: yes")
        lines.append("mismatches: 0")
    return "\n".join(lines) + "\n"


def windows(ids: list[int], n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens, evenly spaced over ids (leaving room for nothing after the last)."""
    if len(ids) < length:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than --prompt-len {length}")
    span = len(ids) - length
    return [ids[(span * i) // max(n - 1, 1):][:length] for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--text", help="text file the prompts are windows of (outside the training corpus)")
    p.add_argument("--tiny-cpu", action="store_true",
                   help="tiny preset, random weights, CPU: a smoke run (--dtype bf16 casts it)")
    p.add_argument("--n-draft", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--step-cost", nargs="+", metavar="K:RATIO",
                   help="cost of a K-draft step over a plain step (default: 1:1.81 3:1.75, H100/H200 `small`)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--seed", type=int, default=0, help="(--tiny-cpu) the random weights' seed")
    p.add_argument("--batch-invariant", action="store_true",
                   help="decode (plain and speculative) inside dsv4.ops.batch_invariant(); every mismatch fails")
    p.add_argument("--tie-ulps", type=float, default=TIE_ULPS,
                   help="a mismatch is a near-tie when the two tokens' logits are this many ulps (of the model's "
                        "dtype at the largest |logit|) apart or less (default %(default)s)")
    p.add_argument("--step-loop", action="store_true",
                   help="decode with the step_row loop (eager) instead of the pipelined greedy_row_stream")
    p.add_argument("--out", help="result file (default: bench/results/<date>_<device>_<commit>_mtp_acceptance.txt)")
    args = p.parse_args(argv)
    costs = parse_costs(args.step_cost)
    from provenance import record, result_path

    from dsv4.checkpoint import resolve_device
    device = torch.device("cpu") if args.tiny_cpu else resolve_device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.tiny_cpu:
        cfg = dsv4.ModelConfig.preset("tiny")
        model = dsv4.Transformer(cfg).init_weights(seed=args.seed).eval().to_dtype(dtype)
        source = f"tiny preset, random weights (seed {args.seed})"
        ids = (open(args.text, "rb").read() if args.text else bytes(range(256)) * 64)
        ids = [b % cfg.vocab_size for b in ids]
    else:
        if not args.checkpoint or not args.text:
            p.error("--checkpoint and --text are needed (or --tiny-cpu)")
        from dsv4.checkpoint import load_model
        from dsv4.generate import Tokenizer
        model = load_model(args.checkpoint, device=device, dtype=dtype).eval()
        with open(args.text, encoding="utf-8") as f:
            ids = Tokenizer.from_dir(args.checkpoint).encode(f.read())
        source = f"checkpoint {args.checkpoint}"
    prompts = windows(ids, args.prompts, args.prompt_len)
    if args.batch_invariant and (device.type != "cuda" or dtype == torch.float32):
        print("note: the batch-invariant kernels cover CUDA bf16 / fp16 models; here the mode changes little or "
              "nothing (dsv4/ops/invariant)", file=sys.stderr)
    diagnose = Diagnosis(model, args.tie_ulps)
    with dsv4.ops.batch_invariant(args.batch_invariant):
        _, plain = measure(model, prompts, args.max_new, [])
    rec = record(str(device))
    header = [f"MTP acceptance per draft position: {source}; text {args.text or '(bytes 0..255)'}",
              f"{len(prompts)} prompts of {args.prompt_len} tokens, {args.max_new} new tokens each, greedy, "
              f"dtype {str(dtype).replace('torch.', '')}",
              f"date {rec['date']}, device {rec['device']}, commit {rec['commit']}",
              "command: python bench/mtp_acceptance.py " + " ".join(sys.argv[1:] if argv is None else argv),
              f"plain greedy output: {distinct_ngrams(plain):.2f} of its 4-grams distinct (low: it loops, "
              "and loops are easy to draft)",
              "acc@j: P(draft j accepted | drafts before it accepted); speed-up = tokens/step / cost "
              "(cost: a k-draft step over a plain step, --step-cost)",
              "speculative decoding: " + ("the step_row loop (eager)" if args.step_loop else
                                          "greedy_row_stream (pipelined; CUDA graphs on a GPU)"),
              f"batch-invariant mode: {'on' if args.batch_invariant else 'off'}; a mismatch is a near-tie when "
              f"plain's and speculative's tokens are within {args.tie_ulps:g} ulp of the largest |logit| in plain's "
              "logits recomputed there", ""]
    path = args.out or result_path("mtp_acceptance", "txt", str(device))
    results: list[Counts] = []
    for k in sorted(set(args.n_draft)):   # the file is rewritten after each n_draft (a run cut short keeps those)
        with dsv4.ops.batch_invariant(args.batch_invariant):
            results += measure(model, prompts, args.max_new, [k], plain, diagnose, not args.step_loop)[0]
        text = report(results, costs, header, strict=args.batch_invariant)
        with open(path, "w") as f:
            f.write(text)
    print(text, end="")
    print(f"wrote {path}")
    failed = failures(results, args.batch_invariant)
    if failed:
        print(f"FAIL: speculative greedy output differs from plain greedy decoding ({len(failed)} mismatch(es) "
              + ("under batch-invariant mode)" if args.batch_invariant else "not a near-tie)"), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
