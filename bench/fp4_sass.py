"""Static instruction counts of the FP4 GEMM kernel's K loop per FP4 decode, compiled for sm_90 on any machine (no
GPU needed: Triton's compiler and the cuobjdump it ships). Not a timing: a check of how much work per weight each
decode (packed_linear.FP4_DECODES) asks of the SMs, to read next to bench/native_gemm.py --fp4-decode.

    python bench/fp4_sass.py [--block-m 16 64] [--block-n 64] [--decodes old words] [--keep DIR]
                             [--gemv-m 1 2 4] [--gemv-n 32] [--gemv-words 64]
    python bench/fp4_sass.py --experts [--tokens 16 32 64] [--experts-n 32 64] [--swap-w 64 128]
                             [--swap-split 1 2 4] [--swap-maxnreg 0 168] [--decodes old words]

"gemv" among --decodes compiles the few-row CUDA-core kernel (packed_linear._fp4_gemv_kernel, no tensor cores)
instead, once per --gemv-m activation-row count (its BLOCK_M), with --gemv-n weight rows (default: as
packed_linear.gemv_config picks) and --gemv-words int32 words per row per K step; its loop is the one around the products (FFMA), one iteration 8 * words K values.

--experts compiles the grouped FP4 experts' sorted-pairs kernels instead (packed_experts: gate/up with its SwiGLU,
and down), per --tokens tile of an expert's pairs: the current ones (_gate_up_kernel, _down_kernel: ROWS pairs x
BLOCK_N weight rows, per --experts-n and FP4 decode of --decodes) and the swapped ones (_swap_gate_up_kernel,
_swap_down_kernel: BLOCK_W weight rows x TOK pairs, per --swap-w, per --swap-split K split (SPLIT; every split > 1
compiles to the same code, the slice count being the grid's) and per --swap-maxnreg register cap (Triton's maxnreg,
0 = none)). Their loop is the innermost one around the tensor-core instructions (the K loop inside the loop over
token tiles); per weight = per weight decoded per thread in one K step (gate/up decodes w1 and w3), and the
shared-memory bytes per weight show whether the decoded weights go through shared memory (the raw FP4 bytes, copied
in by cp.async and read back once by their own thread, are 0.5 B per weight). Each row also gives the kernel's stack
frame (spilled registers; cuobjdump's STACK) and the programs of 4 warps an sm_90 SM holds at its registers and
shared memory (`resident`): the occupancy the registers buy.

Each kernel is compiled as a launch would specialise it (pointers and N, K, row strides divisible by 16: without
that Triton cannot vectorise the byte loads and the counts mean nothing). The loop is the longest backward branch
of the SASS around a tensor-core instruction; one iteration is one FP4 step (128 K values) of a BLOCK_M x BLOCK_N output tile, i.e.
BLOCK_N * 128 / (32 * warps) weights per thread. Below each row, the loop's memory instructions by kind and width
(LDG global loads, LDGSTS cp.async global -> shared copies, LDS / LDSM shared loads, STS / STSM shared stores; no
width suffix = 32 bits) and the bytes per thread each kind moves per iteration: the L1 / shared-memory traffic of
one K step, which the kernel is bound by at decode sizes.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dsv4.ops.triton import packed_experts, packed_linear

SIGNATURE = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*u8", "out_ptr": "*bf16", "part_ptr": "*fp32",
             "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "STEPS": "i32", "STEPS_PER": "i32",
             "SPLIT": "i32", "rs_x": "i32", "rs_w": "i32", "rs_s": "i32", "BLOCK_M": "constexpr",
             "BLOCK_N": "constexpr", "REDUCE": "constexpr", "IEEE": "constexpr", "DECODE": "constexpr"}
ALIGNED = ("x_ptr", "w_ptr", "s_ptr", "out_ptr", "part_ptr", "cnt_ptr", "N", "K", "rs_x", "rs_w", "rs_s")
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
MEMORY = ("LDG", "LDGSTS", "LDS", "LDSM", "STS", "STSM")
WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


GEMV_SIGNATURE = {**{k: v for k, v in SIGNATURE.items() if k not in ("REDUCE", "IEEE", "DECODE")},
                  "WORDS": "constexpr", "REDUCE": "constexpr"}

# the grouped experts' kernels as moe_experts_fp4 launches them on bf16 activations, sorted pairs (argument types;
# "c": constexpr); EXPERTS_ALIGNED: the integers that are multiples of 16 at V4-Flash sizes (F 2048, C 4096)
_EXPERT_INTS = dict(F="i32", C="i32", we_stride="i32", se_stride="i32", rs_w="i32", rs_s="i32")
EXPERT_SIGNATURES = {
    "_gate_up_kernel": dict(x_ptr="*bf16", tok_ptr="*i32", rw_ptr="*fp32", active_ptr="*i32", offs_ptr="*i32",
                            w1_ptr="*u8", s1_ptr="*u8", w3_ptr="*u8", s3_ptr="*u8", h_ptr="*bf16", part_ptr="*fp32",
                            cnt_ptr="*i32", F="i32", C="i32", limit="fp32", we_stride="i32", se_stride="i32",
                            rs_w="i32", rs_s="i32", k="i32", STEPS_PER="i32"),
    "_down_kernel": dict(h_ptr="*bf16", active_ptr="*i32", offs_ptr="*i32", w2_ptr="*u8", s2_ptr="*u8",
                         y_ptr="*bf16", part_ptr="*fp32", cnt_ptr="*i32", C="i32", F="i32", we_stride="i32",
                         se_stride="i32", rs_w="i32", rs_s="i32", STEPS_PER="i32"),
    "_swap_gate_up_kernel": dict(xs_ptr="*bf16", tok_ptr="*i32", rw_ptr="*fp32", active_ptr="*i32",
                                 offs_ptr="*i32", w1_ptr="*u8", s1_ptr="*u8", w3_ptr="*u8", s3_ptr="*u8",
                                 h_ptr="*bf16", F="i32", C="i32", rs_x="i32", rs_h="i32", limit="fp32",
                                 we_stride="i32", se_stride="i32", rs_w="i32", rs_s="i32", part_ptr="*fp32",
                                 cnt_ptr="*i32", P="i32", STEPS_PER="i32"),
    "_swap_down_kernel": dict(hs_ptr="*bf16", active_ptr="*i32", offs_ptr="*i32", w2_ptr="*u8", s2_ptr="*u8",
                              y_ptr="*bf16", C="i32", F="i32", rs_h="i32", we_stride="i32", se_stride="i32",
                              rs_w="i32", rs_s="i32", part_ptr="*fp32", cnt_ptr="*i32", P="i32", STEPS_PER="i32"),
}
EXPERTS_ALIGNED = (*_EXPERT_INTS, "STEPS_PER", "rs_x", "rs_h")


def compile_kernel(kernel, signature: dict, constexprs: dict, aligned, warps: int = 4, stages: int = 3,
                   maxnreg: int | None = None):
    """The sm_90 compiled kernel of `kernel` with the runtime arguments of `signature` (constexprs added as such),
    the pointers and the integers named in `aligned` marked multiples of 16 (as a launch specialises them);
    `maxnreg`: Triton's register cap (None: the compiler's choice)."""
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if signature[n].startswith("*") or n in aligned}
    options = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)


def compile_cubin(kernel, signature: dict, constexprs: dict, aligned, warps: int = 4, stages: int = 3) -> bytes:
    """The sm_90 cubin of compile_kernel's kernel."""
    return compile_kernel(kernel, signature, constexprs, aligned, warps, stages).asm["cubin"]


def resident(registers: int, shared: int, warps: int = 4) -> int:
    """Programs of `warps` warps an sm_90 SM holds at `registers` per thread (allocated per warp in units of 256 of
    its 65536) and `shared` bytes of shared memory each (228 KB per SM, 1 KB of it reserved per program), at most
    32 programs and 64 warps."""
    per_warp = 256 * -(-32 * registers // 256)
    by_registers = 65536 // per_warp // warps
    by_shared = 233472 // (shared + 1024)
    return min(by_registers, by_shared, 32, 64 // warps)


def cubin(decode: str, block_m: int, block_n: int, warps: int = 4, stages: int = 4, words: int = 64) -> bytes:
    """The sm_90 cubin of _fp4_weight_kernel under `decode`, or of _fp4_gemv_kernel (decode "gemv", `words`
    int32 words per row per step, one stage as packed_linear launches it)."""
    gemv = decode == "gemv"
    signature = GEMV_SIGNATURE if gemv else SIGNATURE
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED}
    if gemv:
        kernel, constexprs, stages = packed_linear._fp4_gemv_kernel, {"WORDS": words}, 1
    else:
        kernel, constexprs = packed_linear._fp4_weight_kernel, {"IEEE": False, "DECODE": decode}
    constexprs.update(BLOCK_M=block_m, BLOCK_N=block_n, REDUCE=4)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    return compiled.asm["cubin"]


def loop_body(sass: str, innermost: bool = False) -> list[str]:
    """The instructions (predicates dropped) of the K loop: from the target of the longest backward branch whose
    body has a tensor-core instruction (HMMA / HGMMA) or, in the CUDA-core GEMV, an fp32 multiply-add (FFMA; not
    the split-K epilogue's reduction loop, which only adds) to the branch; `innermost`: the shortest such branch
    (the experts' K loop sits inside their loop over token tiles)."""
    body = [(int(a, 16), text) for a, text in INSTRUCTION.findall(sass)]
    loop = None
    for at, text in body:
        branch = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < at:
            target = int(branch.group(1), 16)
            mma = any("MMA" in t.split()[0] or t.startswith("FFMA") for a, t in body if target <= a <= at)
            longer = loop is None or at - target > loop[1] - loop[0]
            if mma and (loop is None or longer != innermost):
                loop = (target, at)
    if loop is None:
        return []
    return [re.sub(r"^@!?U?P\w+\s+", "", text) for at, text in body if loop[0] <= at <= loop[1]]


def loop_counts(sass: str, innermost: bool = False) -> collections.Counter:
    """Opcode counts (modifiers dropped) of the longest loop (`innermost`: loop_body's)."""
    return collections.Counter(text.split()[0].split(".")[0] for text in loop_body(sass, innermost))


def memory_counts(sass: str, innermost: bool = False) -> tuple[collections.Counter, collections.Counter]:
    """({(kind, width in bytes): instructions}, {kind: bytes per thread}) of the longest loop's memory
    instructions (MEMORY), width from the opcode's modifiers (LDSM .x1/.x2/.x4: 4/8/16 bytes; none: 4)."""
    counts, traffic = collections.Counter(), collections.Counter()
    for text in loop_body(sass, innermost):
        parts = text.split()[0].split(".")
        if parts[0] not in MEMORY or text.startswith(("LDS RZ", "LDS.U8 RZ")):   # @!PT LDS RZ: never issued
            continue
        if parts[0] in ("LDSM", "STSM"):
            width = 4 * int(parts[-1]) if parts[-1] in ("1", "2", "4") else 16
        else:
            width = next((WIDTH[m] for m in parts[1:] if m in WIDTH), 4)
        counts[parts[0], width] += 1
        traffic[parts[0]] += width
    return counts, traffic


def memory_line(sass: str, innermost: bool = False) -> str:
    """memory_counts as one line: kind x count @ width bytes, then bytes per thread per kind."""
    counts, traffic = memory_counts(sass, innermost)
    ops = "  ".join(f"{kind}.{width}B x{n}" for (kind, width), n in sorted(counts.items()))
    moved = "  ".join(f"{kind} {n} B" for kind, n in sorted(traffic.items()))
    return f"    memory | {ops} | per thread: {moved}"


def disassemble(binary: bytes, path: str, cuobjdump: str) -> tuple[str, str]:
    """(SASS, registers per thread) of a cubin, which is kept at `path` (and its SASS beside it)."""
    with open(path, "wb") as f:
        f.write(binary)
    sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    with open(path.replace(".cubin", ".sass"), "w") as f:
        f.write(sass)
    usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
    return sass, re.search(r"REG:(\d+)", usage).group(1)


def stack_bytes(path: str, cuobjdump: str) -> int:
    """The per-thread stack frame of a cubin (where spilled registers go; 0 without spills)."""
    usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))


def expert_cases(tokens: list[int], experts_n: list[int], swap_w: list[int], decodes: list[str],
                 swap_splits: list[int] = (1,), swap_maxnreg: list[int | None] = (None,)):
    """(label, kernel, constexprs, weight rows per K step, matrices decoded per K step, pipeline stages as launched,
    register cap) of the grouped experts' sorted-pairs kernels: the current ones per FP4 decode and BLOCK_N, the
    swapped ones per BLOCK_W, K split (SPLIT; REDUCE as packed_experts._swapped picks it) and register cap, per
    token tile. The current gate/up runs one K loop per matrix (w1, then w3, each reading the activations); the
    swapped one decodes both in one."""
    for tok in tokens:
        for name in ("gate_up", "down"):
            for decode in decodes:
                for bn in experts_n:
                    flags = dict(BLOCK_N=bn, ROWS=tok, IEEE=False, DIRECT=False, SPLIT=1, REDUCE=1, DECODE=decode,
                                 GEMV=False, WORDS=packed_linear.GEMV_WORDS)
                    if name == "gate_up":
                        flags["CLAMP"] = True
                    yield (f"{name:7s} {decode:5s} T {tok:2d} W {bn:3d}", getattr(packed_experts, f"_{name}_kernel"),
                           flags, bn, 1, 3, None)
            mats = 2 if name == "gate_up" else 1
            for bw in swap_w:
                for split in swap_splits:
                    for cap in swap_maxnreg:
                        flags = dict(BLOCK_W=bw, TOK=tok, IEEE=False, **({"CLAMP": True} if name == "gate_up" else {}))
                        flags.update(SPLIT=split, SUB=packed_experts.SWAP_SUM_ROWS)
                        label = f"{name:7s} swap  T {tok:2d} W {bw:3d} S {split:2d}" + (f" R {cap}" if cap else "")
                        yield (label, getattr(packed_experts, f"_swap_{name}_kernel"), flags, bw, mats,
                               packed_experts.SWAP_STAGES, cap)


def experts_main(args, cuobjdump: str, out: str) -> None:
    """--experts: one line per expert kernel and tile, then its K loop's memory instructions."""
    print("kernel  decode tokens x weight rows [S split] [R register cap] | K-loop instructions, per weight per "
          "thread, registers (stack bytes: spills), programs per SM (resident) | shared-memory bytes per weight: read (LDS+LDSM), "
          "written (STS+STSM)", flush=True)
    for label, kernel, flags, rows, mats, stages, cap in expert_cases(
            args.tokens, args.experts_n, args.swap_w, args.decodes, args.swap_split, args.swap_maxnreg):
        signature = EXPERT_SIGNATURES[kernel.fn.__name__]
        path = os.path.join(out, "_".join(label.split()) + ".cubin")
        compiled = compile_kernel(kernel, signature, flags, EXPERTS_ALIGNED, stages=stages, maxnreg=cap)
        sass, regs = disassemble(compiled.asm["cubin"], path, cuobjdump)
        counts = loop_counts(sass, innermost=True)
        total = sum(counts.values())
        weights = mats * rows * packed_linear.FP4_STEP // (32 * 4)        # per thread per K step
        _, traffic = memory_counts(sass, innermost=True)
        read = (traffic["LDS"] + traffic["LDSM"]) / weights
        written = (traffic["STS"] + traffic["STSM"]) / weights
        spill = stack_bytes(path, cuobjdump)
        ctas = resident(int(regs), compiled.metadata.shared)
        print(f"{label} {stages} stages | {total:5d} instr, {total / weights:5.2f} / weight, {regs:>3s} regs "
              f"({spill} B stack), {ctas} / SM | smem read {read:5.2f} B / weight, written {written:5.2f} B / weight",
              flush=True)
        print(memory_line(sass, innermost=True), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--block-m", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--decodes", nargs="+", default=[*packed_linear.FP4_DECODES, "gemv"],
                    choices=[*packed_linear.FP4_DECODES, "gemv"])
    ap.add_argument("--gemv-m", type=int, nargs="+", default=[1, 2, 4], help="BLOCK_M of the gemv kernel")
    ap.add_argument("--gemv-n", type=int, help="weight rows per program (default: packed_linear.gemv_config's)")
    ap.add_argument("--gemv-words", type=int, default=packed_linear.GEMV_WORDS)
    ap.add_argument("--keep", help="directory to keep the cubins and SASS in")
    ap.add_argument("--experts", action="store_true", help="the grouped experts' sorted-pairs kernels instead")
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 32, 64], help="--experts: pairs per token tile")
    ap.add_argument("--experts-n", type=int, nargs="+", default=[32, 64],
                    help="--experts: BLOCK_N (weight rows) of the current kernels")
    ap.add_argument("--swap-w", type=int, nargs="+", default=[64, 128],
                    help="--experts: BLOCK_W (weight rows) of the swapped kernels")
    ap.add_argument("--swap-split", type=int, nargs="+", default=[1, 2, 4],
                    help="--experts: K slices (SPLIT) of the swapped kernels")
    ap.add_argument("--swap-maxnreg", type=int, nargs="+", default=[0],
                    help="--experts: register caps (Triton's maxnreg) of the swapped kernels; 0: none")
    args = ap.parse_args()
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = args.keep or tempfile.mkdtemp()
    os.makedirs(out, exist_ok=True)
    print(f"Triton {triton.__version__}, sm_90", flush=True)
    if args.experts:
        args.swap_maxnreg = [cap or None for cap in args.swap_maxnreg]
        if "--decodes" not in os.sys.argv:
            args.decodes = ["old", "words"]
        experts_main(args, cuobjdump, out)
        return
    cases = [(bm, d) for bm in args.block_m for d in args.decodes if d != "gemv"]
    cases += [(bm, "gemv") for bm in args.gemv_m if "gemv" in args.decodes]
    for block_m, decode in cases:
        gemv = decode == "gemv"
        block_n = (args.gemv_n or packed_linear.GEMV_BLOCK_N[block_m > 1]) if gemv else args.block_n
        binary = cubin(decode, block_m, block_n, words=args.gemv_words)
        sass, regs = disassemble(binary, os.path.join(out, f"fp4_{decode}_m{block_m}_n{block_n}.cubin"), cuobjdump)
        counts = loop_counts(sass)
        total = sum(counts.values())
        step = 8 * args.gemv_words if gemv else packed_linear.FP4_STEP
        weights = block_n * step // (32 * 4)
        top = "  ".join(f"{op} {n}" for op, n in counts.most_common(8))
        print(f"BLOCK_M {block_m:3d} {decode:8s} loop {total:5d} instructions ({total / weights:4.1f} per weight "
              f"per thread, {step} K values), {regs} registers | {top}", flush=True)
        print(memory_line(sass), flush=True)


if __name__ == "__main__":
    main()
