"""Label Studio's brush RLE, encoded with numpy.

Brush regions carry their mask as ``value.rle``: a list of byte values of a
bit stream that the Label Studio frontend decodes (thi-ng's ``rle-pack``
format). label-studio-sdk's ``converter.brush.mask2rle`` builds that stream
as a Python string of ``"0"``/``"1"`` characters, run by run, which takes
from a few hundred milliseconds to seconds for a full-HD mask with many runs:
longer than SAM's decoder. :func:`mask_to_rle` gives the same list of ints
with a handful of array operations.

The format, as ``mask2rle`` writes it (bits, most significant first):

- header: the number of values (32 bits; 4 per pixel, the mask is encoded as
  an RGBA image with the same value in each channel), word size - 1 (5 bits,
  7), and the four run-length widths - 1 (4 bits each; 3, 4, 8 and 16);
- one block per run of equal values: ``1``, the index of the narrowest
  width that holds the run length - 1 (2 bits), run length - 1 in that many
  bits, the value (8 bits, 0 or 255). A run longer than 2**16 is cut into
  blocks of 2**16 values and one block with the rest, all with the 16-bit
  width;
- zero bits up to the next whole byte, a whole zero byte if already whole.

A run always has a multiple of 4 values, so ``mask2rle``'s literal block for
a run of one value never occurs and is not implemented here.
"""

from __future__ import annotations

import numpy as np

__all__ = ["mask_to_rle"]

_U = np.uint64  # every bit-level array: numpy 1 turns uint64 mixed with int64 into float
# The run-length widths (bits) mask2rle declares in the header, narrowest first.
_LENGTH_BITS = np.array([3, 4, 8, 16], dtype=_U)
_LONGEST_BLOCK = 2**16
_WORD_BITS = 8


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """A 2-D mask as Label Studio brush RLE, the same list as the SDK's ``mask2rle``.

    Args:
        mask: ``(H, W)`` bool or integer array; nonzero is inside.

    Returns:
        The ``value.rle`` of a brush region, byte for byte what label-studio-sdk's
        ``mask2rle`` gives for the mask as a 0/255 uint8 image (for a bool
        mask, ``mask2rle(mask.astype(np.uint8) * 255)``).

    Raises:
        ValueError: the mask is not 2-D, is empty, or is too large for the 32-bit length.

    Example:
        >>> import numpy as np
        >>> mask_to_rle(np.array([[0, 1]], dtype=bool))
        [0, 0, 0, 8, 57, 27, 252, 96, 17, 255, 128]
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"The mask must be 2-D, not of shape {mask.shape}.")
    # astype(bool) is "nonzero", and free for a bool mask (comparing with 0 is not).
    inside = mask.astype(bool, copy=False).ravel()
    count = 4 * inside.size  # RGBA: four values per pixel
    if not count:
        raise ValueError(f"The mask is empty (shape {mask.shape}).")
    if count >= 2**32:
        raise ValueError(f"A {mask.shape[0]}x{mask.shape[1]} mask is too large for Label Studio's RLE.")

    # Runs of equal pixels, counted in values (x4 channels) as the stream counts them.
    change = np.flatnonzero(inside[1:] != inside[:-1]) + 1
    starts = np.concatenate(([0], change))
    lengths = np.diff(starts, append=inside.size).astype(_U) << _U(2)
    values = inside[starts].astype(_U) * _U(255)
    # The narrowest width that holds length - 1 picks the block type (0-3).
    kind = (lengths > 8).astype(_U) + (lengths > 16) + (lengths > 256)

    # Runs longer than 2**16 become several blocks: full ones, then the rest
    # (rare: only large uniform areas, so the bookkeeping costs nothing usually).
    if lengths.max() > _LONGEST_BLOCK:
        blocks = ((lengths + _U(_LONGEST_BLOCK - 1)) >> _U(16)).astype(np.intp)  # ceil(length / 2**16)
        run = np.repeat(np.arange(lengths.size), blocks)
        last = np.zeros(run.size, dtype=bool)
        last[np.cumsum(blocks) - 1] = True
        rest = lengths - ((blocks - 1).astype(_U) << _U(16))
        lengths = np.where(last, rest[run], _U(_LONGEST_BLOCK))
        values, kind = values[run], kind[run]

    length_bits = _LENGTH_BITS[kind]
    widths = length_bits + _U(1 + 2 + _WORD_BITS)
    codes = (
        (_U(1) << (widths - _U(1)))
        | (kind << (length_bits + _U(_WORD_BITS)))
        | ((lengths - _U(1)) << _U(_WORD_BITS))
        | values
    )

    header = (count, 32), (_WORD_BITS - 1, 5), *((int(b) - 1, 4) for b in _LENGTH_BITS)
    codes = np.concatenate((np.array([c for c, _ in header], dtype=_U), codes))
    widths = np.concatenate((np.array([w for _, w in header], dtype=_U), widths))
    return _concatenate_bits(codes, widths)


def _concatenate_bits(codes: np.ndarray, widths: np.ndarray) -> list[int]:
    """The codes (uint64, each ``widths`` bits, at most 32) one after the other, as bytes.

    Each code is shifted into place in big-endian 64-bit words; one that
    crosses a word boundary is split between two. Codes never share bits, so
    OR-ing the pieces of each word together (a segmented reduction, as the
    codes are in order) builds the stream without a loop.
    """
    ends = np.cumsum(widths)
    # mask2rle pads with 1 to 8 zero bits: a whole zero byte when already aligned.
    n_bytes = int(ends[-1]) // 8 + 1
    words = np.zeros((n_bytes + 7) // 8, dtype=_U)

    word = (ends - widths) >> _U(6)
    end_in_word = ends - (word << _U(6))  # 1..96: the bit after the code, from the word's top
    fits = end_in_word <= 64
    shift_left = np.where(fits, _U(64) - end_in_word, _U(0))
    shift_right = np.where(fits, _U(0), end_in_word - _U(64))
    index = word.astype(np.intp)
    first = np.flatnonzero(index[1:] != index[:-1]) + 1
    first = np.concatenate(([0], first))
    words[index[first]] |= np.bitwise_or.reduceat((codes << shift_left) >> shift_right, first)
    # The low bits of a code that crosses a boundary; at most one per word.
    spill = np.flatnonzero(~fits)
    words[index[spill] + 1] |= codes[spill] << (_U(128) - end_in_word[spill])
    # list(bytes) is about twice as fast as ndarray.tolist() for the same ints.
    return list(words.astype(">u8").tobytes()[:n_bytes])
