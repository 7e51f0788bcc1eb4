"""GPTQ v1 output: the packed tensors decode (by an unpacker written here from the published
layout, independent of qtool's) to exactly the weights qtool dequantizes; the config fields;
``qtool eval`` loads the folder; bad input and failure leave nothing behind.

Published layout (AutoGPTQ ``auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py``,
``QuantLinear.pack``; GPTQModel reads the same "gptq" v1 format): ``qweight[r, o]`` holds input
rows ``r*32/b ..`` of output column ``o``, value ``j`` of the word group at bit ``j*b`` of the
little-endian ``32*b``-bit stream (3-bit values straddle words); ``qzeros`` packs ``zero - 1``
the same way along the output dim; ``w[o, i] = scales[g, o] * (q[i, o] - (qz[g, o] + 1))``
with ``g = g_idx[i]``.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from qtool.checkpoint import open_checkpoint
from qtool.errors import BadInputError, OutputError
from qtool.formats.folder import WriteRequest, write_checkpoint
from qtool.formats.gptq import pack_weight
from qtool.grids.affine import QuantizedWeight, QuantScheme
from tests.conftest import make_tiny_llama
from tests.quantize.formats_helpers import logits, reference_logits, rtn_loaders, write

# -- an independent reference unpacker, deliberately naive (Python ints, one bit stream) --------


def stream_unpack(words: torch.Tensor, bits: int, count: int) -> list[list[int]]:
    """Column ``c`` of ``words`` [n_words, cols] is one little-endian bit stream (word 0 lowest);
    value ``k`` is bits ``k*bits .. k*bits+bits-1``. Returns ``count`` values per column."""
    cols = []
    for c in range(words.shape[1]):
        stream = 0
        for r in range(words.shape[0]):
            stream |= (int(words[r, c]) & 0xFFFFFFFF) << (32 * r)
        cols.append([(stream >> (k * bits)) & ((1 << bits) - 1) for k in range(count)])
    return cols  # [cols][count]


def reference_dequant(t: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    qweight, qzeros, scales, g_idx = t["qweight"], t["qzeros"], t["scales"], t["g_idx"]
    n_in, n_out = qweight.shape[0] * 32 // bits, qweight.shape[1]
    q = stream_unpack(qweight, bits, n_in)  # q[o][i]
    z = stream_unpack(qzeros.t(), bits, n_out)  # z[g][o]: qzeros' rows are groups
    w = torch.empty(n_out, n_in)
    for o in range(n_out):
        for i in range(n_in):
            g = int(g_idx[i])
            w[o, i] = float(scales[g, o]) * (q[o][i] - (z[g][o] + 1))
    return w


def autogptq_pack3(intweight: torch.Tensor) -> torch.Tensor:
    """The 3-bit branch of AutoGPTQ's published ``pack`` loop, restated: per 32 input rows, 10
    values, one split 2+1 bits, 10 values, one split 1+2 bits, 10 values, into 3 words."""
    rows, cols = intweight.shape
    out = [[0] * cols for _ in range(rows // 32 * 3)]
    for c in range(cols):
        v = [int(x) for x in intweight[:, c]]
        i = row = 0
        while row < len(out):
            for j in range(10):
                out[row][c] |= v[i + j] << (3 * j)
            i += 10
            out[row][c] |= (v[i] << 30) & 0xFFFFFFFF
            out[row + 1][c] |= (v[i] >> 2) & 1
            i += 1
            for j in range(10):
                out[row + 1][c] |= v[i + j] << (3 * j + 1)
            i += 10
            out[row + 1][c] |= (v[i] << 31) & 0xFFFFFFFF
            out[row + 2][c] |= (v[i] >> 1) & 3
            i += 1
            for j in range(10):
                out[row + 2][c] |= v[i + j] << (3 * j + 2)
            i += 10
            row += 3
    t = torch.tensor(out, dtype=torch.int64)
    return torch.where(t >= 2**31, t - 2**32, t).to(torch.int32)


def hand_made(bits: int, sym: bool, act_order: bool, out_f: int = 64, in_f: int = 128):
    g = torch.Generator().manual_seed(bits * 10 + sym * 2 + act_order)
    scheme = QuantScheme(bits=bits, sym=sym, group_size=32)
    groups = in_f // 32
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g).to(torch.uint8)
    scale = (torch.rand(out_f, groups, generator=g) * 0.1 + 1e-3).half().float()
    if sym:
        zero = torch.full((out_f, groups), 1 << (bits - 1), dtype=torch.int32)
    else:
        zero = torch.randint(1, 1 << bits, (out_f, groups), generator=g).to(torch.int32)
    g_idx = None
    if act_order:  # GPTQ act-order: column perm[k] belongs to group k // group_size
        perm = torch.randperm(in_f, generator=g)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = (torch.arange(in_f) // 32).to(torch.int32)
    return QuantizedWeight("layer", codes, scale, zero, scheme, g_idx)


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_tensors_decode_exactly(bits: int, sym: bool, act_order: bool) -> None:
    qw = hand_made(bits, sym, act_order)
    t = pack_weight(qw)
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (128 * bits // 32, 64)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (4, 64 * bits // 32)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (4, 64)
    assert t["g_idx"].dtype == torch.int32 and t["g_idx"].shape == (128,)
    assert torch.equal(reference_dequant(t, bits), qw.dequantize())
    if bits == 3:  # the interleaved 3-bit words, bit for bit
        assert torch.equal(t["qweight"], autogptq_pack3(qw.codes.t().to(torch.int64)))


def test_bits_5_refused_naming_compressed_tensors(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="compressed-tensors") as e:
        write(tiny_llama, tmp_path / "q5", "gptq", QuantScheme(bits=5, group_size=64))
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


def _act_order(qw: QuantizedWeight) -> None:
    g = torch.Generator().manual_seed(qw.shape[1])
    perm = torch.randperm(qw.shape[1], generator=g)
    idx = torch.empty(qw.shape[1], dtype=torch.int32)
    idx[perm] = (torch.arange(qw.shape[1]) // qw.scheme.group_size).to(torch.int32)
    qw.g_idx = idx


def test_config_fields_and_files(tiny_tok: Path, tmp_path: Path) -> None:
    scheme = QuantScheme(bits=4, sym=False, group_size=64)
    _, out = write(tiny_tok, tmp_path / "g", "gptq", scheme, edit=_act_order)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    expect = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True,
              "sym": False, "checkpoint_format": "gptq", "static_groups": False}  # fmt: skip
    assert {k: q[k] for k in expect} == expect
    assert {"damp_percent", "true_sequential"} <= set(q)
    assert json.loads((out / "quantize_config.json").read_text()) == q
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "README.md", "tokenizer.json", "generation_config.json"} <= files
    card = (out / "README.md").read_text()
    assert "act-order (desc_act) | yes" in card and "not measured" in card
    ckpt = open_checkpoint(str(out))
    assert ckpt.tensors["model.layers.0.mlp.down_proj.qweight"].shape == (512 * 4 // 32, 256)
    assert ckpt.tensors["model.embed_tokens.weight"].dtype == "BF16"
    assert "model.layers.0.mlp.down_proj.weight" not in ckpt.tensors


@pytest.mark.parametrize("sym,act_order", [(True, False), (False, True)], ids=["sym", "asym-ao"])
def test_qtool_eval_loads_gptq(cli, tiny_tok: Path, tmp_path: Path, sym, act_order) -> None:
    """qtool's unpacker (gptqmodel absent) gives exactly apply_dequantized's logits; ``qtool
    eval`` runs on the folder."""
    from qtool.evaluate.loaders import load_gptq_unpacked

    scheme = QuantScheme(bits=4, sym=sym, group_size=64)
    loaders, out = write(tiny_tok, tmp_path / "g", "gptq", scheme,
                         edit=_act_order if act_order else None)  # fmt: skip
    model = load_gptq_unpacked(open_checkpoint(str(out)), torch.float32, "cpu")
    assert (logits(model) - reference_logits(tiny_tok, loaders)).abs().max().item() == 0.0
    r = cli("eval", out, "--base", tiny_tok, "--dataset", "canterbury:alice29.txt",
            "--ctx", "64", "--chunks", "1", "--threads", "1", "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    a = r.json()["artifacts"][0]
    assert a["kind"] == "gptq" and 0.0 < a["kld"]["mean"] < 0.5


def test_read_only_output_dir(tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        import os

        if os.geteuid() == 0:  # root writes anywhere: make the permission check see it
            monkeypatch.setattr("qtool.io.os.access", lambda *a: False)
        with pytest.raises(BadInputError, match="not writable"):
            write(tiny_llama, ro / "out", "gptq", QuantScheme(group_size=64))
        assert not list(ro.iterdir())
    finally:
        ro.chmod(0o755)


def test_failure_leaves_nothing_and_keeps_old_output(tiny_llama: Path, tmp_path: Path,
                                                     monkeypatch) -> None:  # fmt: skip
    """A loader failing midway and a full disk: no temp folder left, an existing output kept."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    ckpt = open_checkpoint(str(tiny_llama))
    scheme = QuantScheme(group_size=64)
    loaders = rtn_loaders(ckpt, scheme)
    last = list(loaders)[-1]

    def boom() -> QuantizedWeight:
        raise BadInputError("synthetic failure")

    with pytest.raises(BadInputError, match="synthetic"):
        write_checkpoint(WriteRequest(ckpt, out, "gptq", scheme, {**loaders, last: boom}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("qtool.formats.streamed._copy_range", full)  # writing a shard
    with pytest.raises(OutputError, match="no space left") as e:
        write_checkpoint(WriteRequest(ckpt, out, "gptq", scheme, loaders))
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.undo()
    write_checkpoint(WriteRequest(ckpt, out, "gptq", scheme, loaders))  # replaces it now
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_shards_and_tied_embeddings(tmp_path: Path, monkeypatch) -> None:
    """Several shards get an index; a tied model gets no lm_head tensor."""
    src = make_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    monkeypatch.setattr("qtool.formats.folder.MAX_SHARD_BYTES", 600_000)
    _, out = write(src, tmp_path / "o", "gptq", QuantScheme(bits=8, granularity="tensor"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((out / s).exists() for s in shards)
    assert "lm_head.weight" not in index["weight_map"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == -1
    shutil.rmtree(out)
