"""The integer grid under GGUF blocks (``block_affine`` / ``block_codes`` / ``block_with_codes``)
against llama.cpp.

Every block comes from llama.cpp's own quantizer (``ggml_quantize_chunk``, with and without an
importance matrix) and every decoded value from its ``to_float``; qtool's codecs are never the
reference here. For each quantized type we check that

* rewriting a block with its own codes gives back llama.cpp's bytes exactly;
* ``scale * code + offset`` is what llama.cpp decodes, for the stored codes and for random ones
  written with ``block_with_codes`` (so the packer puts the bits where llama.cpp reads them),
  and ``block_codes`` reads the written codes back;
* the header bytes (d, dmin, sub-block scales and mins) are never touched.

Tolerance: none. The affine form equals llama.cpp's float32 decode exactly (compared as
numbers, so -0.0 == +0.0) wherever the block's fp16 scale fields are finite: where ggml's
expression differs from ``scale * code + offset`` (Q4_0's ``(q - 8) * d``, Q3_K's
``dl * (q - 4)``, Q6_K's ``d * sc * (q - 32)``, the ternary ``(q - 1) * d``) every product has
at most 24 significant bits, so both are exact. A block whose fp16 d or dmin overflowed to inf
(the huge synthetic cases) has no affine form: there we require that scale or offset is
non-finite and that llama.cpp decodes a non-finite value too.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from codec_cases import imatrix_for, synthetic_cases
from codec_check import assert_same_blocks
from qtool.kernels import (
    Codec,
    CodecInputError,
    block_affine,
    block_codes,
    block_with_codes,
    codec_for,
    get_type,
    quantize,
)

GRID_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
              "TQ1_0", "TQ2_0"]  # fmt: skip
FLOAT_TYPES = ["F32", "F16", "BF16"]
CASES = synthetic_cases()

# Where each block keeps its quant bits, from llama.cpp's ggml-common.h (block_q4_K etc.): bytes
# [start, stop). Everything else in a block is header and must survive block_with_codes.
QUANT_BYTES = {
    "Q8_0": (2, 34),  # d, qs[32]
    "Q4_0": (2, 18),  # d, qs[16]
    "Q4_1": (4, 20),  # d, m, qs[16]
    "Q5_0": (2, 22),  # d, qh[4], qs[16]
    "Q5_1": (4, 24),  # d, m, qh[4], qs[16]
    "Q2_K": (16, 80),  # scales[16], qs[64], d, dmin
    "Q3_K": (0, 96),  # hmask[32], qs[64], scales[12], d
    "Q4_K": (16, 144),  # d, dmin, scales[12], qs[128]
    "Q5_K": (16, 176),  # d, dmin, scales[12], qh[32], qs[128]
    "Q6_K": (0, 192),  # ql[128], qh[64], scales[16], d
    "TQ1_0": (0, 52),  # qs[48], qh[4], d
    "TQ2_0": (0, 64),  # qs[64], d
}
CODE_RANGES = {
    "Q8_0": (-128, 127),
    "Q4_0": (0, 15),
    "Q4_1": (0, 15),
    "Q5_0": (0, 31),
    "Q5_1": (0, 31),
    "Q2_K": (0, 3),
    "Q3_K": (0, 7),
    "Q4_K": (0, 15),
    "Q5_K": (0, 31),
    "Q6_K": (0, 63),
    "TQ1_0": (0, 2),
    "TQ2_0": (0, 2),
}


def _assert_affine(
    ref: np.ndarray, scale: np.ndarray, offset: np.ndarray, codes: np.ndarray, label: str
) -> None:
    """llama.cpp's decode ``ref`` equals ``scale * codes + offset`` exactly where scale and
    offset are finite; elsewhere llama.cpp's value must be non-finite as well."""
    assert scale.dtype == offset.dtype == np.float32, label
    assert scale.shape == offset.shape == codes.shape == ref.shape, label
    with np.errstate(all="ignore"):
        ours = scale * codes.astype(np.float32) + offset
    defined = np.isfinite(scale) & np.isfinite(offset)
    bad = defined & (ours != ref)
    if bad.any():
        r, i = np.argwhere(bad)[0]
        raise AssertionError(
            f"{label}: {int(bad.sum())} of {int(defined.sum())} values differ from llama.cpp; "
            f"first at ({r}, {i}): scale {scale[r, i]!r} * code {codes[r, i]} + offset "
            f"{offset[r, i]!r} = {ours[r, i]!r}, llama.cpp {ref[r, i]!r}"
        )
    undefined_but_finite = ~defined & np.isfinite(ref)
    assert not undefined_but_finite.any(), (
        f"{label}: {int(undefined_but_finite.sum())} values have a non-finite scale/offset "
        f"but llama.cpp decodes them finite, first at {np.argwhere(undefined_but_finite)[0]}"
    )


def _assert_header_kept(new: np.ndarray, old: np.ndarray, type_name: str, label: str) -> None:
    qt = get_type(type_name)
    a, b = QUANT_BYTES[type_name]
    keep = np.ones(qt.type_size, bool)
    keep[a:b] = False
    n_old = old.reshape(-1, qt.type_size)[:, keep]
    n_new = new.reshape(-1, qt.type_size)[:, keep]
    assert np.array_equal(n_new, n_old), f"{label}: block_with_codes changed header bytes"


def _check(ggml, type_name: str, rows: np.ndarray, label: str) -> None:
    qt = get_type(type_name)
    n = rows.shape[1]
    rng = np.random.default_rng(zlib.crc32(f"{type_name} {label}".encode()))
    for imatrix in (None, imatrix_for(n)):
        tag = f"{label} {type_name} {'imatrix' if imatrix is not None else 'no imatrix'}"
        q = ggml.quantize(qt, rows, imatrix)
        scale, offset, lo, hi = block_affine(q, qt)
        assert (lo, hi) == CODE_RANGES[type_name], tag
        assert scale.shape == offset.shape == rows.shape, tag

        # llama.cpp's own codes: in range, rewritten byte for byte, decoded as the affine form
        codes = block_codes(q, qt)
        assert codes.dtype == np.int32 and codes.shape == rows.shape, tag
        assert codes.min() >= lo and codes.max() <= hi, f"{tag}: stored codes out of range"
        assert_same_blocks(block_with_codes(q, qt, codes), q, qt, f"{tag} with_codes(codes)")
        _assert_affine(ggml.dequantize(qt, q, n), scale, offset, codes, f"{tag} stored codes")

        # new codes: llama.cpp reads them where we wrote them, under the unchanged scales
        patterns = {
            "random": rng.integers(lo, hi + 1, rows.shape),
            "extremes": np.where(rng.random(rows.shape) < 0.5, lo, hi),
        }
        for what, c in patterns.items():
            c = c.astype(np.int64 if what == "random" else np.int16)  # any integer dtype
            q2 = block_with_codes(q, qt, c)
            assert q2.dtype == np.uint8 and q2.shape == q.shape, tag
            _assert_header_kept(q2, q, type_name, f"{tag} {what}")
            s2, o2, _, _ = block_affine(q2, qt)
            assert np.array_equal(s2.view(np.uint32), scale.view(np.uint32)), tag
            assert np.array_equal(o2.view(np.uint32), offset.view(np.uint32)), tag
            _assert_affine(ggml.dequantize(qt, q2, n), scale, offset, c, f"{tag} {what} codes")
            back = block_codes(q2, qt)
            assert np.array_equal(back, c), f"{tag}: block_codes(with_codes(c)) != c ({what})"
        assert not np.shares_memory(q2, q)


@pytest.mark.parametrize("type_name", GRID_TYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_grid_synthetic(ggml, type_name: str, case: str) -> None:
    _check(ggml, type_name, CASES[case], case)


@pytest.mark.parametrize("type_name", GRID_TYPES)
def test_grid_real_rows(ggml, real_rows, type_name: str) -> None:
    for name, rows in real_rows.items():
        _check(ggml, type_name, rows, name)


def test_grid_types_are_the_quantized_ones() -> None:
    grids = sorted(k for k, c in Codec.registry.items() if c.code_range is not None)
    assert grids == sorted(GRID_TYPES)
    for t in GRID_TYPES:
        assert codec_for(t).code_range == CODE_RANGES[t]


@pytest.mark.parametrize("type_name", ["Q4_K", "Q8_0", "TQ1_0"])
def test_leading_shapes_and_chunks(type_name: str, monkeypatch) -> None:
    """(..., row_bytes) like dequantize, and the same answer whatever the chunking."""
    from qtool.kernels import api

    qt = get_type(type_name)
    x = np.random.default_rng(3).standard_normal((2, 3, 512)).astype(np.float32)
    q = quantize(x, qt, threads=1)
    codes = block_codes(q, qt)
    scale, offset, _, _ = block_affine(q, qt)
    assert codes.shape == scale.shape == offset.shape == x.shape
    flat = q.reshape(6, -1)
    assert np.array_equal(codes.reshape(6, -1), block_codes(flat, qt))
    monkeypatch.setattr(api, "CHUNK_VALUES", 512)  # one row per chunk
    assert np.array_equal(block_codes(q, qt), codes)
    assert np.array_equal(block_affine(q, qt)[0], scale)
    assert np.array_equal(block_with_codes(q, qt, codes), q)
    # zero rows
    empty = np.zeros((0, q.shape[-1]), np.uint8)
    assert block_codes(empty, qt).shape == (0, 512)
    assert block_with_codes(empty, qt, np.zeros((0, 512), np.int32)).shape == empty.shape


def _raises(match: str, fn, *args, **kwargs) -> CodecInputError:  # type: ignore[no-untyped-def]
    with pytest.raises(CodecInputError, match=match) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, f"not a one-line error: {msg!r}"
    return info.value


@pytest.mark.parametrize("type_name", GRID_TYPES)
def test_codes_out_of_range(type_name: str) -> None:
    qt = get_type(type_name)
    lo, hi = CODE_RANGES[type_name]
    q = quantize(np.ones((2, 512), np.float32), qt, threads=1)
    c = np.full((2, 512), lo, np.int32)
    c[1, 300] = hi + 1
    e = _raises(rf"code {hi + 1} at index \(1, 300\) is outside", block_with_codes, q, qt, c,
                name="blk.2.ffn_up.weight")  # fmt: skip
    assert "blk.2.ffn_up.weight" in str(e) and f"[{lo}, {hi}]" in str(e)
    c[1, 300] = lo
    c[0, 5] = lo - 1
    _raises(rf"code {lo - 1} at index \(0, 5\)", block_with_codes, q, qt, c)
    # the codec method itself refuses too
    codec = codec_for(qt)
    blocks = q.reshape(-1, qt.type_size)
    _raises(r"outside", codec.with_codes, blocks, c.reshape(-1, qt.block_size))


def test_wrong_shapes_and_dtypes() -> None:
    q = quantize(np.ones((2, 512), np.float32), "Q4_K", threads=1)
    c = np.zeros((2, 512), np.int32)
    _raises(r"w: codes have shape \(2, 256\), expected \(2, 512\)", block_with_codes, q, "Q4_K",
            c[:, :256], name="w")  # fmt: skip
    _raises(r"codes have shape \(512,\)", block_with_codes, q, "Q4_K", c[0])
    _raises("codes must be integers, got dtype float32", block_with_codes, q, "Q4_K",
            c.astype(np.float32))  # fmt: skip
    _raises("codes must be a numpy array", block_with_codes, q, "Q4_K", c.tolist())
    for fn, extra in ((block_codes, ()), (block_affine, ()), (block_with_codes, (c,))):
        _raises("w: last dimension \\(145,\\) is not a whole number of 144-byte Q4_K blocks",
                fn, np.zeros((2, 145), np.uint8), "Q4_K", *extra, name="w")  # fmt: skip
        _raises("expected uint8 block bytes, got int8", fn, q.view(np.int8), "Q4_K", *extra)
        _raises("no codec for tensor type 'Q7_X'", fn, q, "Q7_X", *extra)
    codec = codec_for("Q6_K")
    blocks = quantize(np.ones((1, 256), np.float32), "Q6_K").reshape(-1, 210)
    _raises(r"Q6_K: codes have shape \(1, 16\)", codec.with_codes, blocks,
            np.zeros((1, 16), np.int32))  # fmt: skip


@pytest.mark.parametrize("type_name", FLOAT_TYPES)
def test_float_types_have_no_grid(type_name: str) -> None:
    data = quantize(np.ones((2, 64), np.float32), type_name)
    for fn, extra in ((block_codes, ()), (block_affine, ()), (block_with_codes, (data,))):
        e = _raises(f"t: {type_name} has no affine grid of integer codes", fn, data,
                    type_name, *extra, name="t")  # fmt: skip
        assert "Q4_K" in str(e)
    codec = codec_for(type_name)
    assert codec.code_range is None
    with pytest.raises(NotImplementedError, match="not a grid of integer codes"):
        codec.codes(data.reshape(-1, codec.qtype.type_size))


def test_mxfp4_has_a_table_not_an_affine_grid() -> None:
    """MXFP4's 16 values per block are not evenly spaced: no affine view, a table instead."""
    data = quantize(np.linspace(-3, 3, 64, dtype=np.float32).reshape(2, 32), "MXFP4")
    _raises("t: MXFP4 has no affine grid of integer codes", block_affine, data, "MXFP4", name="t")
    codec = codec_for("MXFP4")
    table = codec.table(data.reshape(-1, codec.qtype.type_size))  # type: ignore[attr-defined]
    assert table.shape == (2, 16) and len(np.unique(np.diff(np.sort(table[0])))) > 1
