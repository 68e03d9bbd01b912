"""collectives.tensors.slice_checksum, the parity digest's per-slice checksum: what it always catches."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from collectives import tensors

_ROW = tensors._ROW_WORDS


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6), st.integers(0, 3 * _ROW * 8 + 13), st.sampled_from(["one", "row", "column", "corner"]),
       st.integers(0, 10**9), st.integers(1, 2**64 - 1), st.integers(1, 2**64 - 1))
def test_slice_checksum_catches_every_change_of_up_to_three_words(rows: int, tail: int, shape: str, where: int,
                                                                   d1: int, d2: int) -> None:
    """The 2-D sum code: changing one word, or two or three words placed so that as many row and column
    sums as possible cancel (same row, same column, an L), always changes the checksum; so does any change
    in the tail that does not fill a row."""
    nbytes = rows * _ROW * 8 + tail
    base = np.random.default_rng(where).integers(0, 256, nbytes, dtype=np.uint8)
    ref = tensors.slice_checksum(base)
    words = base[:rows * _ROW * 8].view("<u8").reshape(rows, _ROW).copy()
    r, c = where % rows, (where // rows) % _ROW
    r2, c2 = (r + 1 + where % max(1, rows - 1)) % rows, (c + 1 + where % (_ROW - 1)) % _ROW
    m = 2**64
    if shape == "one":
        changes = [((r, c), d1)]
    elif shape == "row":  # two words in one row whose changes cancel in the row sum
        changes = [((r, c), d1), ((r, c2), m - d1)]
    elif shape == "column":
        changes = [((r, c), d1), ((r2, c), m - d1)] if rows > 1 else [((r, c), d1)]
    else:  # an L: row r cancels between (r, c) and (r, c2), column c between (r, c) and (r2, c)
        changes = [((r, c), d1), ((r, c2), m - d1), ((r2, c), m - d1)] if rows > 1 else [((r, c), d1)]
    for (i, j), d in changes:
        words[i, j] = (int(words[i, j]) + d) % m
    changed = base.copy()
    changed[:rows * _ROW * 8] = words.reshape(-1).view(np.uint8)
    assert tensors.slice_checksum(changed) != ref
    if tail:
        changed = base.copy()
        changed[-1 - where % tail] ^= 1 + d2 % 255
        assert tensors.slice_checksum(changed) != ref
    assert tensors.slice_checksum(base[:-1]) != ref, "the length is part of the checksum"
