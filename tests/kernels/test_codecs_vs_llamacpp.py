"""qtool's GGUF codecs against llama.cpp's, byte for byte, on synthetic and real rows.

Every type is encoded by qtool (numpy reference path, and the compiled fast path where there
is one) and by ``ggml_quantize_chunk`` from llama-cpp-python's libggml, with and without an
importance matrix; the bytes must be identical block by block. Decoding is checked bit for bit
against llama.cpp's ``to_float`` and gguf-py's ``dequantize``.
"""

from __future__ import annotations

import numpy as np
import pytest
from codec_cases import imatrix_for, synthetic_cases
from codec_check import assert_same_blocks, assert_same_floats
from qtool.kernels import QUANT_TYPES, codec_for, dequantize, get_type, quantize

TYPES = list(QUANT_TYPES)
CASES = synthetic_cases()


def _backends(type_name: str) -> list[str]:
    """The numpy path always; the compiled one where the type has it and numba imports."""
    codec = codec_for(type_name)
    return ["reference"] + (["fast"] if codec.fast_kernel(False) is not None else [])


def _check_encode(ggml, type_name: str, rows: np.ndarray, label: str) -> None:
    qt = get_type(type_name)
    im = imatrix_for(rows.shape[1])
    for imatrix in (None, im):
        ref = ggml.quantize(qt, rows, imatrix)
        for backend in _backends(type_name):
            ours = quantize(rows, qt, imatrix, backend=backend, threads=1)
            path = "imatrix" if imatrix is not None else "no imatrix"
            tag = f"{label} {type_name} {path} [{backend}]"
            assert_same_blocks(ours, ref, qt, tag)


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_encode_synthetic(ggml, type_name: str, case: str) -> None:
    _check_encode(ggml, type_name, CASES[case], case)


@pytest.mark.parametrize("type_name", TYPES)
def test_encode_real_rows(ggml, real_rows, type_name: str) -> None:
    for name, rows in real_rows.items():
        _check_encode(ggml, type_name, rows, name)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # gguf-py on blocks with an inf scale
@pytest.mark.parametrize("type_name", TYPES)
def test_decode_matches_llamacpp_and_gguf(ggml, real_rows, type_name: str) -> None:
    """Decode llama.cpp's own bytes: qtool == ggml to_float == gguf-py, bit for bit."""
    import gguf

    qt = get_type(type_name)
    inputs = [CASES["normal"], CASES["zero_constant_grid"], CASES["huge_1e6"], CASES["huge_1e12"]]
    inputs += list(real_rows.values())[:2]
    for rows in inputs:
        data = ggml.quantize(qt, rows)
        ours = dequantize(data, qt, rows.shape[1])
        assert_same_floats(ours, ggml.dequantize(qt, data, rows.shape[1]), f"{type_name} vs ggml")
        theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(qt.ggml_id))
        assert_same_floats(ours, theirs.astype(np.float32), f"{type_name} vs gguf-py")


GGUF_ENCODERS = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "TQ1_0", "TQ2_0"]


@pytest.mark.parametrize("type_name", GGUF_ENCODERS)
def test_encode_matches_gguf_py(ggml, type_name: str) -> None:
    """gguf-py's numpy quantizers, where it has them, are a second reference.

    They agree with llama.cpp except for the sign of a zero scale or min (an all-zero block
    gets d = 0/-8 = -0.0 in C, +0.0 in gguf-py); where gguf-py differs from llama.cpp we still
    require the same decoded values.
    """
    import gguf

    qt = get_type(type_name)
    for case in ("normal", "heavy_tailed", "outliers", "zero_constant_grid"):
        rows = CASES[case]
        theirs = np.asarray(gguf.quants.quantize(rows, gguf.GGMLQuantizationType(qt.ggml_id)))
        theirs = theirs.view(np.uint8).reshape(rows.shape[0], -1)
        ours = quantize(rows, qt, threads=1)
        llama = ggml.quantize(qt, rows)
        a = ours.reshape(-1, qt.type_size)
        b = theirs.reshape(-1, qt.type_size)
        gguf_off = (b != llama.reshape(-1, qt.type_size)).any(axis=1)
        same = ~gguf_off
        assert_same_blocks(a[same][None], b[same][None], qt, f"{case} vs gguf-py")
        if gguf_off.any():
            da = dequantize(a[gguf_off], qt)
            db = dequantize(b[gguf_off], qt)
            assert np.array_equal(da, db), f"{case}: gguf-py differs beyond the sign of zero"


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q4_0"])
def test_threads_and_shapes(ggml, type_name: str) -> None:
    """Any leading shape and any thread count give the same bytes as one llama.cpp call."""
    qt = get_type(type_name)
    rows = CASES["outliers"]
    ref = ggml.quantize(qt, rows)
    for threads in (1, 2, 3):
        assert_same_blocks(quantize(rows, qt, threads=threads), ref, qt, f"threads={threads}")
    cube = quantize(rows.reshape(2, 4, -1), qt, threads=2)
    assert cube.shape == (2, 4, ref.shape[1])
    assert_same_blocks(cube.reshape(ref.shape), ref, qt, "3-d input")
