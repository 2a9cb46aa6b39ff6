"""Restoring a row from a chain of pieces writes each piece at its record offset: pieces that follow one another
go in one cat, others in grouped copies; both write exactly what copying piece by piece does."""
import pytest
import torch

from dsv4.cache.row_state import _copy_pieces


def _reference(dest, parts):
    out = dest.clone()
    for start, p in parts:
        out[start: start + p.shape[0]] = p
    return out


def _parts(offsets_and_lengths, width=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(s, torch.randn(n, width, generator=g)) for s, n in offsets_and_lengths]


@pytest.mark.parametrize("layout", [
    [(0, 4), (4, 1), (5, 3)],          # a chain from the start: one cat
    [(2, 2), (4, 5)],                  # contiguous from an offset
    [(0, 2), (3, 2)],                  # a gap: one copy each
    [(0, 3)],                          # one piece
    [(0, 0), (0, 4), (4, 0)],          # empty pieces
])
def test_pieces_land_where_piece_by_piece_copies_put_them(layout):
    dest = torch.full((12, 3), -7.0)
    parts = _parts(layout)
    want = _reference(dest, parts)
    _copy_pieces(dest, parts)
    assert torch.equal(dest, want)


def test_pieces_longer_than_the_row_raise():
    with pytest.raises(RuntimeError):
        _copy_pieces(torch.zeros(5, 3), _parts([(0, 4), (4, 3)]))


def test_pieces_of_another_dtype_are_copied_one_by_one():
    dest = torch.zeros(6, 3, dtype=torch.float64)
    parts = _parts([(0, 2), (2, 3)])
    _copy_pieces(dest, parts)
    assert torch.equal(dest, _reference(torch.zeros(6, 3, dtype=torch.float64), parts))


def test_grouped_copies_write_the_bytes_single_copies_write():
    from dsv4.cache.row_state import clone_tensors, copy_tensors
    g = torch.Generator().manual_seed(1)
    srcs = [torch.randn(4, 3, generator=g).to(dt) for dt in (torch.bfloat16, torch.float32, torch.float8_e4m3fn)]
    srcs += [torch.randint(0, 255, (7,), generator=g, dtype=torch.uint8), torch.randn(5, generator=g)]
    dests = [torch.zeros_like(s) for s in srcs[:-1]] + [torch.zeros(9, dtype=torch.float64)[2:7]]  # (a cast)
    copy_tensors(dests, srcs)
    assert all(torch.equal(d.view(torch.uint8), s.view(torch.uint8)) for d, s in zip(dests[:-1], srcs[:-1]))
    assert torch.equal(dests[-1], srcs[-1].double())
    clones = clone_tensors({str(i): s for i, s in enumerate(srcs)})
    assert all(c.data_ptr() != s.data_ptr() and torch.equal(c.view(torch.uint8), s.view(torch.uint8))
               for c, s in zip(clones.values(), srcs))
