"""load_model: a checkpoint directory (official or transformers naming, bf16/fp32/FP8/FP4) -> Transformer.

Two phases, shared by the one-process loader and the sharded one (`dsv4.distributed.load_sharded`):

1. `plan_checkpoint` reads the config and the safetensors headers (and the small hash-routing tables) and checks
   them against the full model: shard paths, truncated files, missing, unexpected, duplicated, mis-shaped and
   mis-typed tensors, block scales, expert ids. Every problem is reported once, naming the tensor, its shape
   and the expected one, before any weight is read, so a bad checkpoint never half-loads.
2. `load_weights` asks a slicing hook which part of each checkpoint tensor this process keeps (all of it, or a
   tensor-/expert-parallel rank's rows, columns or experts), checks those parts against the model it fills
   (built on the meta device, possibly already sharded), materialises that model once on the target device
   and streams the shards one tensor at a time (memory-mapped), dequantising FP8/FP4 exactly, or, for a model
   whose layers were packed (`weights="native"`), copying the FP8/FP4 bytes and scales as they are.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ..config import ModelConfig
from ..model import Transformer
from ..model.moe import RoutedExperts
from ..model.norm import Linear
from ..quant.packed import FP8_BLOCK
from ..quant import dequant_fp4_blocks, dequant_fp8_blocks, float_to_e8m0
from .device import resolve_device
from .names import FP8_WEIGHTS, Target, official_to_native, to_official
from .safetensors_io import CheckpointError, ShardReader, TensorInfo, read_header
from .shards import list_shards

__all__ = ["load_model", "plan_checkpoint", "load_weights", "pack_native", "CheckpointPlan", "Piece", "Slicing",
           "keep_all", "WEIGHTS"]

log = logging.getLogger(__name__)
_FLOAT = ("F64", "F32", "F16", "BF16")
_INTEGER = ("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8")
_PACKED_FP4 = ("I8", "U8", "F4")               # one byte holds two e2m1 values: meaningless without its scale
_SCALE = ("F8_E8M0", "U8", "I8", "F32", "BF16", "F16")   # UE8M0 exponent bytes, or plain float scales
_ID_TABLES = ("tid2eid",)                      # the only tensors that are integer by nature (token -> experts)
_EXPERT_STACKS = ("experts.w1", "experts.w2", "experts.w3")
WEIGHTS = ("native", "bf16")                   # load_model's choices: the checkpoint's formats, or dequantised


@dataclass
class _Item:
    name: str                 # name in the file
    info: TensorInfo
    targets: list[Target]
    scale: tuple[str, TensorInfo] | None  # (name in file, info) of its block scale, if quantised
    fmt: str                  # "plain" | "fp8" | "fp4"
    shape: tuple[int, ...]    # after dequantisation
    value: torch.Tensor | None = None     # already read while planning (the small hash-routing tables)


@dataclass
class CheckpointPlan:
    """A checkpoint whose headers matched the full model: what `load_weights` streams."""
    path: str
    config: ModelConfig       # as the model must be built (without MTP when the checkpoint has none)
    files: list[str]
    items: list[_Item]


@dataclass(frozen=True)
class Piece:
    """A part of one checkpoint tensor and where it lands. `index` slices the leading dimensions of the
    (dequantised) tensor, `()` meaning all of it; it lands in `param[expert]`, or in the whole parameter."""
    index: tuple[slice, ...] = ()
    expert: int | None = None


# Per native target: given the piece a one-process load copies, the piece this process keeps (None: nothing).
Slicing = Callable[[Target, Piece], Optional[Piece]]


def keep_all(target: Target, piece: Piece) -> Piece:
    return piece


# ---------------------------------------------------------------------------------------------- phase 1: plan
def plan_checkpoint(path: str | os.PathLike) -> CheckpointPlan:
    """Read `config.json` and every shard header and check them against the full model; read and check the
    hash-routing tables. Raises CheckpointError listing every problem; reads no other weight."""
    path = os.fspath(path)
    cfg = ModelConfig.from_pretrained(path)
    files = list_shards(path)
    headers: dict[str, tuple[str, TensorInfo]] = {}
    problems: list[str] = []
    for f in files:
        for name, info in read_header(f).items():
            off = to_official(name)
            if off in headers:
                problems.append(f"tensor '{name}' in {f} appears twice (also as '{headers[off][0]}' in "
                                f"{headers[off][1].file})")
                continue
            headers[off] = (name, info)
    if cfg.n_mtp_layers and not any(k.startswith("mtp.") for k in headers):
        log.warning("%s has no mtp.* tensors: loading without the MTP module", path)
        cfg = cfg.replace(n_mtp_layers=0, compress_ratios=cfg.compress_ratios[: cfg.n_layers])
    with torch.device("meta"):
        expected = _fillable(Transformer(cfg))
    items = _match(cfg, headers, expected, problems)
    _raise(problems, f"{path}: checkpoint does not match the model")
    _read_id_tables(path, items, cfg.n_routed_experts)
    return CheckpointPlan(path, cfg, files, items)


@dataclass
class _PackedSlot:
    """Where a packed (FP8 / FP4) checkpoint tensor lands in a model loaded with native weights: its bytes and
    its scale buffers. `shape` is the dequantised shape, which the checks compare as for a parameter."""
    data: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, ...]
    fmt: str

    def fill(self, name: str, data: torch.Tensor, scale: torch.Tensor, expert: int | None,
             part: list[tuple[int, int]] | None = None) -> None:
        """Copy the checkpoint tensor's bytes and scales, or only the FP8 tile-aligned rows / columns `part`
        ((start, stop) per dimension: a tensor-parallel rank's part, `_tile_aligned`)."""
        d = self.data if expert is None else self.data[expert]
        s = self.scale if expert is None else self.scale[expert]
        data, scale = data.view(torch.uint8), _ue8m0(name, scale)
        if part is not None:
            data = data[tuple(slice(a, b) for a, b in part)]
            scale = scale[tuple(slice(a // FP8_BLOCK, -(-b // FP8_BLOCK)) for a, b in part)]
        d.copy_(data)
        s.copy_(scale)


def _tile_aligned(box: list[tuple[int, int]] | None, shape: tuple[int, ...]) -> bool:
    """A part of an FP8 tensor that native weights can keep: every edge on a 128 x 128 scale tile's edge (or the
    tensor's end), so its tiles are whole tiles of the checkpoint's scale grid."""
    return box is not None and all(a % FP8_BLOCK == 0 and (b % FP8_BLOCK == 0 or b == n)
                                   for (a, b), n in zip(box, shape))


def _ue8m0(name: str, scale: torch.Tensor) -> torch.Tensor:
    """A checkpoint scale as UE8M0 bytes: as stored, or from float scales that are powers of two."""
    if scale.element_size() == 1:
        return scale.view(torch.uint8)
    try:
        return float_to_e8m0(scale)
    except ValueError:
        raise CheckpointError(f"'{name}': its scales are not powers of two, which native FP8/FP4 weights need "
                              "(UE8M0); load with weights='bf16'") from None


def _fillable(model: Transformer) -> dict[str, torch.Tensor | _PackedSlot]:
    """What a checkpoint fills: every parameter, the hash-routing buffers, and the packed layers' buffers."""
    out: dict[str, torch.Tensor | _PackedSlot] = dict(model.named_parameters())
    out.update((n, b) for n, b in model.named_buffers() if n.endswith(_ID_TABLES))
    for name, m in model.named_modules():
        if isinstance(m, Linear) and m.packed is not None:
            out[f"{name}.weight"] = _PackedSlot(m.qweight, m.qscale, tuple(m.qweight.shape), "fp8")
        elif isinstance(m, RoutedExperts) and m.packed is not None:
            for w, wname in zip(m.packed, ("w1", "w2", "w3")):
                out[f"{name}.{wname}"] = _PackedSlot(w.data, w.scale, tuple(w.shape), "fp4")
    return out


def pack_native(plan: CheckpointPlan, model: Transformer, slicing: Slicing = keep_all) -> list[str]:
    """Switch the layers whose checkpoint tensors are FP8 (the Linear layers of names.FP8_WEIGHTS, which the model
    multiplies as layers; fp32 projections such as the compressor's stay dequantised) or FP4 (routed experts) to
    packed buffers, so that `load_weights` keeps those bytes instead of dequantising them; returns the packed
    module names. Build `model` on the meta device (already sharded, for a rank of a sharded load: `slicing` is
    the part of each tensor it keeps): packing there allocates nothing. Experts stored as FP8 (the lossless
    FP4 -> FP8 conversion) stay dequantised, and so do FP8 layers whose kept part cuts through 128 x 128 scale
    tiles (a tensor-parallel slice of a small model; the official models' slices are tile-aligned)."""
    modules = dict(model.named_modules())
    packed: list[str] = []
    fp4_stacks: dict[str, set[str]] = defaultdict(set)
    for it in plan.items:
        t = it.targets[0]
        owner, _, leaf = t.param.rpartition(".")
        m = modules.get(owner)
        if (it.fmt == "fp8" and t.param.endswith(FP8_WEIGHTS) and isinstance(m, Linear) and m.packed is None
                and _tile_aligned(_kept_box(slicing, t, it.shape), it.shape)):
            m.pack_fp8()
            packed.append(owner)
        elif it.fmt == "fp4" and isinstance(m, RoutedExperts):
            fp4_stacks[owner].add(leaf)
    for owner, leaves in fp4_stacks.items():
        m = modules[owner]
        formats = {it.fmt for it in plan.items if it.targets[0].param.rpartition(".")[0] == owner}
        if leaves == {"w1", "w2", "w3"} and formats == {"fp4"} and m.packed is None:
            m.pack_fp4()
            packed.append(owner)
    return packed


class _Coverage:
    """Which checkpoint tensor fills each parameter (or each expert slot of a stacked one)."""

    def __init__(self) -> None:
        self.by: dict[str, dict[int | None, str]] = defaultdict(dict)

    def claim(self, name: str, pairs: list[tuple[str, int | None]]) -> str | None:
        for param, expert in pairs:
            slots = self.by[param]   # a whole-parameter claim (expert None) clashes with any other claim
            other = next(iter(slots.values()), None) if expert is None else slots.get(expert) or slots.get(None)
            if other is not None:
                what = f"'{param}'" + (f" expert {expert}" if expert is not None else "")
                return f"tensor '{name}' fills {what}, which '{other}' already fills"
        for param, expert in pairs:
            self.by[param][expert] = name
        return None

    def missing(self, expected: dict[str, torch.Tensor]) -> list[str]:
        out = []
        for pname, p in expected.items():
            got = self.by.get(pname, {})
            if None in got:
                continue
            if pname.endswith(_EXPERT_STACKS) and got:
                miss = sorted(set(range(p.shape[0])) - set(got))
                if miss:
                    out.append(f"missing tensor(s) for '{pname}': experts {miss[:8]}{'...' if len(miss) > 8 else ''}"
                               f" (each {tuple(p.shape[1:])})")
            else:
                out.append(f"missing tensor '{pname}' (expected shape {tuple(p.shape)})")
        return out


def _match(cfg: ModelConfig, headers: dict[str, tuple[str, TensorInfo]], expected: dict[str, torch.Tensor],
           problems: list[str]) -> list[_Item]:
    """Match every checkpoint tensor to native parameters, checking names, storage and shapes (one message per
    bad tensor: a tensor that is present but wrong is not also reported missing)."""
    cover = _Coverage()
    items: list[_Item] = []
    used_scales: set[str] = set()
    for off, (name, info) in headers.items():
        if off.endswith(".scale"):
            continue
        stem = off[: -len(".weight")] if off.endswith(".weight") else None
        scale = headers.get(stem + ".scale") if stem is not None else None
        if scale is not None:
            used_scales.add(stem + ".scale")
        targets = official_to_native(off, cfg.moe_inter_dim)
        problem = _unknown(name, info, targets, expected)
        if problem is None:
            problem = cover.claim(name, [(t.param, t.expert) for t in targets])
        if problem is None:
            fmt, shape, problem = _storage(name, info, scale, targets[0].param, expected[targets[0].param])
        if problem is None:
            want = _expected_shape(targets, expected)
            if shape != want:
                stored = f" (packed FP4 stored as {info.shape})" if fmt == "fp4" else ""
                problem = f"tensor '{name}' has shape {shape}{stored}, expected {want}"
        if problem is not None:
            problems.append(problem)
            continue
        items.append(_Item(name, info, targets, scale, fmt, shape))
    for off, (name, info) in headers.items():
        if off.endswith(".scale") and off not in used_scales:
            problems.append(f"unexpected tensor '{name}' {info.shape} (a scale without its weight)")
    problems += cover.missing(expected)
    return items


def _unknown(name: str, info: TensorInfo, targets: list[Target], expected: dict[str, torch.Tensor]) -> str | None:
    for t in targets:
        p = expected.get(t.param)
        if p is None:
            return f"unexpected tensor '{name}' {info.shape}"
        if t.expert is not None and t.expert >= p.shape[0]:
            return f"unexpected tensor '{name}': expert {t.expert} >= n_routed_experts={p.shape[0]}"
    return None


def _storage(name: str, info: TensorInfo, scale: tuple[str, TensorInfo] | None, pname: str,
             param: torch.Tensor) -> tuple[str, tuple[int, ...], str | None]:
    """(format, dequantised shape, problem): how the tensor is stored, refusing storage that would load as
    different numbers (integers or bools read as weights, FP8/FP4 bytes without their scales)."""
    dt, shape = info.dtype, info.shape
    if scale is not None:
        sname, sinfo = scale
        if dt == "F8_E4M3" and len(shape) == 2:
            fmt, want = "fp8", tuple((d + 127) // 128 for d in shape)
        elif dt in _PACKED_FP4 and len(shape) == 2:
            fmt, shape = "fp4", (shape[0], shape[1] * 2)
            if shape[1] % 32:
                return fmt, shape, f"'{name}' (packed FP4 {info.shape}) has {shape[1]} values per row, not a " \
                                   "multiple of the 32-value scale block"
            want = (shape[0], shape[1] // 32)
        else:
            return "", shape, (f"'{name}' {shape} has a block scale but dtype {dt} (expected a 2-D F8_E4M3 or "
                               f"packed FP4 {'/'.join(_PACKED_FP4)} weight)")
        if sinfo.dtype not in _SCALE:
            return fmt, shape, (f"'{sname}' has dtype {sinfo.dtype}, expected a UE8M0 or float scale "
                                f"({'/'.join(_SCALE)})")
        if sinfo.shape != want:
            return fmt, shape, f"'{sname}' has shape {sinfo.shape}, expected {want} for weight {shape}"
        return fmt, shape, None
    if dt == "F8_E4M3":
        return "fp8", shape, f"'{name}' is FP8 but has no '.scale' tensor"
    if not param.is_floating_point():
        if dt in _INTEGER:
            return "plain", shape, None
        return "plain", shape, f"'{name}' {shape} is stored as {dt}, but '{pname}' holds integer ids: expected an " \
                               f"integer dtype"
    if dt in _FLOAT:
        return "plain", shape, None
    if dt in _PACKED_FP4:
        return "plain", shape, (f"'{name}' {shape} is stored as {dt} without a '.scale' tensor: one-byte integers "
                                "are read only as packed FP4 with its block scale")
    return "plain", shape, (f"'{name}' {shape} is stored as {dt}, but it is a floating-point weight: expected "
                            f"{'/'.join(_FLOAT)}, or F8_E4M3 / packed FP4 with a '.scale' tensor")


def _expected_shape(targets: list[Target], expected: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The checkpoint shape the targets need: the parameter's (one expert's, for a per-expert tensor); for row
    pieces (transformers' fused gate_up_proj) exactly the sum of their rows, so extra rows are refused."""
    t0 = targets[0]
    p = expected[t0.param]
    base = tuple(p.shape[1:]) if t0.expert is not None else tuple(p.shape)
    if t0.rows is None:
        return base
    return (base[0], sum(t.rows.stop - t.rows.start for t in targets), *base[2:])


def _read_id_tables(path: str, items: list[_Item], n_experts: int) -> None:
    """Read the hash-routing tables (small) and check every id is an expert; they stay in the plan."""
    problems = []
    for it in items:
        if not it.targets[0].param.endswith(_ID_TABLES):
            continue
        with ShardReader(it.info.file) as reader:
            it.value = reader.get(it.name)
        bad = ((it.value < 0) | (it.value >= n_experts)).flatten().nonzero()
        if len(bad):
            at = tuple(int(i) for i in torch.unravel_index(bad[0, 0], it.value.shape))
            problems.append(f"tensor '{it.name}' {it.shape} holds expert id {int(it.value[at])} at {list(at)} "
                            f"({len(bad)} bad entries): ids must lie in [0, {n_experts - 1}] "
                            f"(n_routed_experts={n_experts})")
    _raise(problems, f"{path}: checkpoint has invalid hash-routing tables")


def _raise(problems: list[str], what: str) -> None:
    if problems:
        shown = "\n  ".join(problems[:25])
        more = f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else ""
        raise CheckpointError(f"{what} ({len(problems)} problem(s)):\n  {shown}{more}")


# ---------------------------------------------------------------------------------------------- phase 2: load
def _kept_box(slicing: Slicing, t: Target, shape: tuple[int, ...]) -> list[tuple[int, int]] | None:
    """The (start, stop) per dimension of the part of a checkpoint tensor that `slicing` keeps for `t`."""
    piece = slicing(t, Piece((slice(None), t.rows) if t.rows is not None else (), t.expert))
    return None if piece is None else _bounds(piece.index, shape)


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[tuple[int, int]] | None:
    """(start, stop) per dimension of `index` over `shape`; None if a slice has a step or leaves the tensor."""
    if len(index) > len(shape):
        return None
    out = []
    for d, size in enumerate(shape):
        s = index[d] if d < len(index) else slice(None)
        start, stop = (0 if s.start is None else s.start), (size if s.stop is None else s.stop)
        if s.step not in (None, 1) or not 0 <= start <= stop <= size:
            return None
        out.append((start, stop))
    return out


def _place(plan: CheckpointPlan, dest: dict[str, torch.Tensor], slicing: Slicing):
    """The pieces this process keeps, checked against the parameters they land in (before any read)."""
    work, problems, cover = [], [], _Coverage()
    for it in plan.items:
        pieces = []
        for t in it.targets:
            piece = slicing(t, Piece((slice(None), t.rows) if t.rows is not None else (), t.expert))
            if piece is None:
                continue
            p, box = dest.get(t.param), _bounds(piece.index, it.shape)
            where = f"'{t.param}'" + (f" expert {piece.expert}" if piece.expert is not None else "")
            if p is None or box is None or (piece.expert is not None and not 0 <= piece.expert < p.shape[0]):
                problems.append(f"tensor '{it.name}' {it.shape}: this process keeps {piece.index} for {where}, "
                                "which its model does not have")
                continue
            got = tuple(b - a for a, b in box)
            if isinstance(p, _PackedSlot) and got != tuple(it.shape) and not (
                    p.fmt == "fp8" and piece.expert is None and _tile_aligned(box, it.shape)):
                problems.append(f"tensor '{it.name}' {it.shape}: this process keeps part of it ({piece.index}), "
                                f"but '{t.param}' holds native {p.fmt.upper()} weights, which load whole tensors "
                                "or FP8 parts on 128 x 128 scale-tile edges only (load with weights='bf16')")
                continue
            want = tuple(p.shape[1:]) if piece.expert is not None else tuple(p.shape)
            if got != want:
                problems.append(f"tensor '{it.name}' {it.shape}: the part this process keeps ({piece.index}) has "
                                f"shape {got}, but {where} has shape {want}")
                continue
            problem = cover.claim(it.name, [(t.param, piece.expert)])
            if problem:
                problems.append(problem)
                continue
            pieces.append((t, piece, box))
        if pieces:
            work.append((it, pieces))
    problems += cover.missing(dest)
    _raise(problems, "this process's part of the checkpoint does not match its model")
    return work


def _read(it: _Item, pieces: list, readers: dict[str, ShardReader]) -> list[torch.Tensor]:
    """The tensor's pieces, reading it once: a plain tensor only over the box its pieces span, a quantised
    one whole (its scales are blocked), dequantised, then sliced."""
    if it.value is not None:
        return [it.value[tuple(slice(a, b) for a, b in box)] for _, _, box in pieces]
    if it.fmt == "plain":
        span = [(min(box[d][0] for _, _, box in pieces), max(box[d][1] for _, _, box in pieces))
                for d in range(len(it.shape))]
        whole = all(a == 0 and b == size for (a, b), size in zip(span, it.shape))
        part = readers[it.info.file].get_slice(it.name, () if whole else tuple(slice(a, b) for a, b in span))
        return [part[tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(box, span))] for _, _, box in pieces]
    t = readers[it.info.file].get(it.name)
    scale_file = it.scale[1].file
    if scale_file not in readers:
        readers[scale_file] = ShardReader(scale_file)
    s = readers[scale_file].get(it.scale[0])
    full = dequant_fp8_blocks(t, s) if it.fmt == "fp8" else dequant_fp4_blocks(t, s)
    return [full[tuple(slice(a, b) for a, b in box)] for _, _, box in pieces]


def _read_packed(it: _Item, readers: dict[str, ShardReader]) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantised tensor's bytes and scales, as stored."""
    if it.fmt not in ("fp8", "fp4"):
        raise CheckpointError(f"tensor '{it.name}' is stored as {it.info.dtype}, but its layer holds native "
                              "FP8/FP4 weights")
    scale_file = it.scale[1].file
    if scale_file not in readers:
        readers[scale_file] = ShardReader(scale_file)
    return readers[it.info.file].get(it.name), readers[scale_file].get(it.scale[0])


def _finite(t: torch.Tensor) -> torch.Tensor:
    """A device flag: every value of t is finite. From its min and max (NaN propagates through both), a reduction
    with no tensor-sized temporary: torch.isfinite would allocate one byte per value, which for the embedding or
    the head is hundreds of MB on top of the model while loading."""
    return torch.isfinite(torch.stack(torch.aminmax(t))).all()


def load_weights(plan: CheckpointPlan, model: Transformer, device: str | torch.device = "cpu",
                 slicing: Slicing = keep_all, progress: bool | None = None) -> Transformer:
    """Fill `model` (built on the meta device from `plan.config`, possibly sharded) with the pieces `slicing`
    keeps; checks them all against the model first, then materialises it on `device` and streams the shards.
    Warns, naming them, about tensors whose loaded values are not finite."""
    work = _place(plan, _fillable(model), slicing)
    model.to_empty(device=device)
    model.reset_buffers()
    params = _fillable(model)
    by_file: dict[str, list] = defaultdict(list)
    for it, pieces in work:
        by_file[it.info.file].append((it, pieces))
    bar = tqdm(total=len(work), desc="loading", unit="tensor",
               disable=not progress if progress is not None else len(work) < 2000)
    finite: list[tuple[str, torch.Tensor]] = []   # one flag per piece, read back once at the end
    with torch.no_grad():
        for f in plan.files:
            readers = {f: ShardReader(f)}
            for it, pieces in by_file.get(f, []):
                if isinstance(params[pieces[0][0].param], _PackedSlot):  # native weights: the bytes as stored
                    data, scale = _read_packed(it, readers)
                    for t, piece, box in pieces:
                        whole = all(a == 0 and b == n for (a, b), n in zip(box, it.shape))
                        params[t.param].fill(it.name, data, scale, piece.expert, None if whole else box)
                    bar.update(1)
                    continue
                for (t, piece, _), src in zip(pieces, _read(it, pieces, readers)):
                    dst = params[t.param].data
                    dst = dst if piece.expert is None else dst[piece.expert]
                    dst.copy_(src)
                    if dst.is_floating_point() and dst.numel():
                        finite.append((it.name, _finite(dst)))
                bar.update(1)
            readers.clear()
    bar.close()
    if finite:
        ok = torch.stack([flag for _, flag in finite]).cpu()
        bad = sorted({finite[i][0] for i in (~ok).nonzero().flatten().tolist()})
        if bad:
            warnings.warn(f"{len(bad)} checkpoint tensor(s) load with NaN or inf values (as stored, or out of "
                          f"range of the model dtype): {bad[:20]}{' ...' if len(bad) > 20 else ''}",
                          RuntimeWarning, stacklevel=2)
    return model.eval()


def default_weights(plan: CheckpointPlan, device: torch.device, dtype: torch.dtype) -> str:
    """load_model's choice when none is given: "native" where the packed layers pay off and run (a checkpoint
    with FP8 / FP4 tensors, inference on a CUDA device in a 16-bit compute dtype), else "bf16"."""
    quantised = any(it.fmt in ("fp8", "fp4") for it in plan.items)
    return "native" if quantised and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) else "bf16"


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
               progress: bool | None = None, weights: str | None = None) -> Transformer:
    """Load a checkpoint directory (`config.json` + safetensors) into a Transformer on `device` ('auto': the GPU
    if there is one).

    `dtype` is the compute dtype; norms, mHC, sinks, ape and the head stay fp32 as in the reference.
    A checkpoint without `mtp.*` tensors (as transformers writes) loads with n_mtp_layers = 0.
    `weights`: "native" keeps FP8 layers and FP4 routed experts in the checkpoint's bytes (inference only: the
    layers multiply through dsv4.ops' packed GEMMs and have no weight parameter); "bf16" dequantises them into
    `dtype` parameters. Default (None): `default_weights` - native for a quantised checkpoint loaded on a GPU
    in bf16 / fp16 (about a quarter of the bf16 bytes, prefill ~0.95x and batch-1 decode ~1.1x bf16's speed on an
    H100: BENCHMARKS.md), bf16 otherwise (CPU, fp32 compute, training, a checkpoint with no FP8 / FP4 tensors).
    """
    if weights not in (None, *WEIGHTS):
        raise ValueError(f"weights={weights!r}: choose from {list(WEIGHTS)} (or None for the default)")
    device = resolve_device(device)
    plan = plan_checkpoint(path)
    if weights is None:
        weights = default_weights(plan, device, dtype)
    with torch.device("meta"):
        model = Transformer(plan.config).to_dtype(dtype)
    if weights == "native":
        pack_native(plan, model)
    return load_weights(plan, model, device, progress=progress)
