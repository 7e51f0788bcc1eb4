"""Fuzzing the inputs users hand qtool: safetensors headers, GGUF headers, recipe files.

Every mutation must end in a correct result or one clean ``error:`` line with exit code 2 (a
bad input) — never a traceback, an internal error, or a hang (hypothesis' deadline).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(
    max_examples=60,
    deadline=5000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)


def _check(r, ok_codes=(0, 2)) -> None:
    assert r.exit_code in ok_codes, (r.exit_code, r.stderr[-500:])
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr[-800:]
    if r.exit_code != 0:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr


# --- safetensors headers --------------------------------------------------------------------


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _valid_header() -> dict:
    return {
        "model.embed_tokens.weight": {"dtype": "F16", "shape": [8, 4], "data_offsets": [0, 64]},
        "model.norm.weight": {"dtype": "F32", "shape": [4], "data_offsets": [64, 80]},
    }


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "num_hidden_layers": 1,
                "hidden_size": 4,
                "intermediate_size": 8,
                "num_attention_heads": 1,
                "vocab_size": 8,
            }
        )
    )
    return tmp_path


_values = st.one_of(
    st.none(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.text(max_size=8),
    st.lists(st.integers(min_value=-5, max_value=2**33), max_size=4),
    st.floats(allow_nan=True),
)


@FUZZ
@given(
    tensor=st.sampled_from(["model.embed_tokens.weight", "model.norm.weight"]),
    key=st.sampled_from(["dtype", "shape", "data_offsets", "extra"]),
    value=_values,
    cut=st.integers(min_value=0, max_value=100),
)
def test_mutated_safetensors_header(cli, folder: Path, tensor, key, value, cut) -> None:
    header = _valid_header()
    header[tensor][key] = value
    blob = _safetensors(header, bytes(80))
    if cut < 100:
        blob = blob[: max(0, len(blob) - cut)]
    (folder / "model.safetensors").write_bytes(blob)
    _check(cli("inspect", folder, "--json"))


@FUZZ
@given(data=st.binary(max_size=200))
def test_random_bytes_as_safetensors(cli, folder: Path, data: bytes) -> None:
    (folder / "model.safetensors").write_bytes(data)
    _check(cli("inspect", folder))


# --- GGUF headers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    import gguf
    import numpy as np

    p = tmp_path_factory.mktemp("g") / "m.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(1)
    w.add_embedding_length(4)
    w.add_head_count(1)
    w.add_feed_forward_length(8)
    w.add_context_length(16)
    w.add_tensor("token_embd.weight", np.ones((8, 4), np.float32))
    w.add_tensor("output_norm.weight", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p.read_bytes()


@FUZZ
@given(
    flips=st.lists(
        st.tuples(st.integers(min_value=0, max_value=400), st.integers(0, 255)), max_size=6
    ),
    cut=st.integers(min_value=0, max_value=600),
)
def test_mutated_gguf(cli, small_gguf: bytes, tmp_path: Path, flips, cut) -> None:
    data = bytearray(small_gguf)
    for pos, val in flips:
        if pos < len(data):
            data[pos] = val
    if cut:
        data = data[: max(0, len(data) - cut)]
    p = tmp_path / "m.gguf"
    p.write_bytes(bytes(data))
    _check(cli("inspect", p, "--json"))


# --- recipes ------------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 300), st.floats(-2, 2), st.text(max_size=10)
)
_yaml_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_KEYS = {
    "stages": ["method", "transform", "alpha", "damp", "clip", "include", "exclude", "act_order"],
    "outputs": ["format", "type", "bits", "group_size", "sym", "path", "imatrix", "tensor_types"],
    "calibration": ["dataset", "samples", "seq_len", "seed", "stats"],
}


@FUZZ
@given(
    section=st.sampled_from(["stages", "outputs", "calibration", "top"]),
    key=st.sampled_from(sorted({k for v in _KEYS.values() for k in v} | {"bogus", "qtool_recipe"})),
    value=_yaml_values,
)
def test_mutated_recipe(cli, tiny_llama: Path, tmp_path: Path, section, key, value) -> None:
    import yaml

    recipe: dict = {
        "calibration": {"dataset": "canterbury", "samples": 4, "seq_len": 32},
        "stages": [{"method": "gptq", "damp": 0.01}],
        "outputs": [{"format": "gptq", "bits": 4, "group_size": 64}],
    }
    if section == "top":
        recipe[key] = value
    elif section == "calibration":
        recipe["calibration"][key] = value
    else:
        recipe[section][0][key] = value
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe))
    _check(cli("quantize", tiny_llama, "--recipe", r, "-o", tmp_path / "o", "--dry-run"))
    assert not (tmp_path / "o").exists()


@FUZZ
@given(text=st.text(max_size=120))
def test_random_text_as_recipe(cli, tiny_llama: Path, tmp_path: Path, text: str) -> None:
    r = tmp_path / "r.yaml"
    r.write_text(text)
    _check(cli("quantize", tiny_llama, "--recipe", r, "-o", tmp_path / "o", "--dry-run"))
