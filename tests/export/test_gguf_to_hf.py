"""GGUF -> Hugging Face checkpoint (``qtool export model.gguf --format safetensors``), checked
against llama.cpp on the GGUF.

Each architecture: a tiny random model is exported by qtool to GGUF F32 and Q8_0, converted
back, loaded by plain ``from_pretrained`` and run; llama.cpp on the GGUF is the reference. The
weights are also compared bit for bit: F32 against the original checkpoint, Q8_0 against
transformers' own GGUF tensor loader (gguf-py's dequantization, an implementation independent of
qtool's codecs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qtool import api
from qtool.errors import BadInputError, CorruptFileError, UnsupportedError
from tests.export.helpers import build_tiny, llama_logits, llama_tokenize


def gguf_to_hf(path: Path, out: Path, *, dtype: str = "auto", on_event: Any = None) -> dict:
    """The conversion through the API (what the CLI's export --format safetensors runs)."""
    res = api.export(str(path), format="safetensors", dtype=dtype, output=out, on_event=on_event)
    return res.outputs[0]


ARCHS = ["llama", "qwen2", "qwen3", "gemma3", "phi3"]
IDS = [int(x) for x in np.random.default_rng(0).integers(3, 1024, size=96)]


def _export(cli: Any, model: Path, out: Path, qtype: str) -> Path:
    if qtype == "F32":
        args = ["export", model, "--outtype", "F32"]
    else:
        args = ["quantize", model, "--method", "kquant", "--type", qtype]
    r = cli(*args, "-o", out, "--tokenizer-pre", "smollm")
    assert r.exit_code == 0, r.stderr
    return out


def _load(folder: Path, dtype: Any = None) -> Any:
    from transformers import AutoModelForCausalLM

    kw = {} if dtype is None else {"dtype": dtype}
    return AutoModelForCausalLM.from_pretrained(folder, **kw)


def _logits(model: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _state(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_arch_roundtrip_matches_llamacpp(cli, assets, tmp_path: Path, arch: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = build_tiny(tmp_path / "model", arch, assets.smollm2_hf)
    f32 = _export(cli, model, tmp_path / "model-f32.gguf", "F32")
    q8 = _export(cli, model, tmp_path / "model-q8.gguf", "Q8_0")

    # F32: dtype auto keeps float32, and the weights are the original ones exactly.
    s = gguf_to_hf(f32, tmp_path / "hf-f32")
    assert s["dtype"] == "float32" and s["tensors"] > 0
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= set(s["files"])
    orig = AutoModelForCausalLM.from_pretrained(model).state_dict()
    mine = _state(tmp_path / "hf-f32")
    assert set(mine) == {k for k in orig if not (s["tied_embeddings"] and k == "lm_head.weight")}
    for k, v in mine.items():
        assert v.dtype == torch.float32 and torch.equal(v, orig[k].float()), k
    hf = _load(tmp_path / "hf-f32")
    assert hf.dtype == torch.float32 and type(hf).__name__ == s["architecture"]
    ref, got = llama_logits(f32, IDS), _logits(hf, IDS)
    # Same float32 weights; the engines only order their sums differently (|logit| <= 2.4).
    # Measured max |dlogit|: 2.5e-4 (qwen2) .. 1.5e-3 (gemma3), top-1 identical everywhere.
    assert np.abs(got - ref).max() < 2e-3 * max(1.0, np.abs(ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.97

    # Q8_0 decoded to float32: bit-identical to transformers' own GGUF tensor loader.
    s = gguf_to_hf(q8, tmp_path / "hf-q8", dtype="float32")
    cfg = AutoConfig.from_pretrained(tmp_path / "hf-q8")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    theirs = load_gguf_checkpoint(str(q8), return_tensors=True, model_to_load=skeleton)
    mine = _state(tmp_path / "hf-q8")
    assert set(mine) <= set(theirs["tensors"])
    for k, v in mine.items():
        assert torch.equal(v, theirs["tensors"][k].float()), k
    ref, got = llama_logits(q8, IDS), _logits(_load(tmp_path / "hf-q8"), IDS)
    # llama.cpp's CPU Q8_0 matmul quantizes the activations to Q8_0 too (vec_dot_q8_0_q8_0);
    # transformers multiplies the same weights with float32 activations. Measured max |dlogit|
    # 0.009 (qwen2) .. 0.052 (gemma3), mean 0.0016 .. 0.0074, for |logit| <= 2.4 (F32 above:
    # 20-40x smaller); near-uniform logits of random weights let up to 4% of top-1 flip.
    d = np.abs(got - ref)
    assert d.max() < 0.05 * max(1.0, np.abs(ref).max()) and d.mean() < 0.015
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9

    # dtype auto for a quantized file: bfloat16, as config and as loaded.
    s = gguf_to_hf(q8, tmp_path / "hf-q8-auto")
    assert s["dtype"] == "bfloat16"
    cfg_json = json.loads((tmp_path / "hf-q8-auto" / "config.json").read_text())
    assert cfg_json["dtype"] == "bfloat16"
    hf = _load(tmp_path / "hf-q8-auto")
    assert hf.dtype == torch.bfloat16
    got = _logits(_load(tmp_path / "hf-q8-auto", torch.float32), IDS)
    # bfloat16 rounds the decoded weights (8-bit mantissa). Measured max |dlogit| 0.010
    # (qwen2) .. 0.054 (gemma3): hardly above float32's, the Q8 activations dominate.
    assert np.abs(got - ref).max() < 0.1 * max(1.0, np.abs(ref).max())


def _llama_tokenize_special(path: Path, text: str) -> list[int]:
    from qtool.llamacpp import open_llama

    llm = open_llama(path, vocab_only=True)
    try:
        return llm.tokenize(text.encode(), add_bos=True, special=True)
    finally:
        llm.close()


def test_tokenizer_matches_llamacpp_and_original(cli, assets, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model = build_tiny(tmp_path / "model", "llama", assets.smollm2_hf)
    gguf = _export(cli, model, tmp_path / "model.gguf", "F32")
    gguf_to_hf(gguf, tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    orig = AutoTokenizer.from_pretrained(model)
    texts = [
        "Hello world",
        "Alice was beginning to get very tired of sitting by her sister on the bank.",
        "  leading spaces, tabs\tand\nnew lines\n\n",
        "héllo wörld — ünïcode ✓ 🦙",
        "I've been 'told he's there, 'RE you sure?",
    ]
    for text in texts:
        ids = tok(text)["input_ids"]  # the specials llama.cpp adds: add_bos=True means "as set"
        assert ids == llama_tokenize(gguf, text, add_bos=True), text
        assert ids == orig(text)["input_ids"], text
    # llama.cpp's "smollm" pre-tokenizer splits every digit off first, which transformers'
    # GGUF conversion lacks (qtool puts it back). The cut tokenizer here comes from
    # transformers' conversion of SmolLM2's GGUF, so it lacks it too: "  3" splits differently.
    text = "In 1865:   3 ducks and 42 geese, 7.5%"
    assert tok(text)["input_ids"] == llama_tokenize(gguf, text, add_bos=True)
    chat = "<|im_start|>user\nhi there<|im_end|>\n"
    assert tok(chat)["input_ids"] == _llama_tokenize_special(gguf, chat)
    assert tok.decode(tok(texts[3])["input_ids"]) == texts[3]


def test_smollm2_asset_converts_and_matches_llamacpp(cli, assets, tmp_path: Path) -> None:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, decoded to float32."""
    from transformers import AutoTokenizer

    out = tmp_path / "smollm2-hf"
    seen: list[dict] = []
    s = gguf_to_hf(assets.smollm2_gguf, out, dtype="float32", on_event=seen.append)
    assert s["architecture"] == "LlamaForCausalLM" and s["tied_embeddings"]
    assert s["params"] == 134_515_008 and s["tokenizer"]["pre"] == "smollm"
    steps = [e for e in seen if e["event"] == "advance"]
    assert [e["completed"] for e in steps] == list(range(1, s["tensors"] + 1))
    assert {e["total"] for e in steps} == {s["tensors"]}
    tok = AutoTokenizer.from_pretrained(out)
    for name in ("alice29.txt", "lcet10.txt"):
        text = (assets.canterbury / name).read_text()
        # every id as llama.cpp's tokenizer of the GGUF (lcet10: whitespace runs before digits)
        assert tok(text)["input_ids"] == llama_tokenize(assets.smollm2_gguf, text, add_bos=True)
    text = (assets.canterbury / "alice29.txt").read_text()
    ids = tok(text[:2000])["input_ids"][:64]
    got = _logits(_load(out), ids)
    ref = llama_logits(assets.smollm2_gguf, ids)
    # llama.cpp multiplies Q4_1 weights with activations quantized to Q8_1; transformers uses
    # float32 activations. Measured: max |dlogit| 1.37 (mean 0.17) for logits up to 35, top-1
    # 59/64. The same difference is there between llama.cpp on this file and llama.cpp on an
    # F32 GGUF of the converted weights (below), so it is llama.cpp's, not the conversion's.
    d = np.abs(got - ref)
    assert d.max() < 2.0 and d.mean() < 0.25
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.85
    # The exact check: the converted weights as F32 GGUF, where llama.cpp quantizes nothing.
    f32 = tmp_path / "reexport-f32.gguf"
    assert cli("export", out, "--outtype", "F32", "-o", f32).exit_code == 0
    ref32 = llama_logits(f32, ids)
    # Measured: max |dlogit| 0.044 (float32 summation order), top-1 identical.
    assert np.abs(got - ref32).max() < 0.1
    assert (got.argmax(-1) == ref32.argmax(-1)).all()


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qtool.cli.app import main

    d = tmp_path_factory.mktemp("g2h")
    model = build_tiny(d / "model", "llama", assets.smollm2_hf)
    out = d / "model.gguf"
    try:
        main(
            ["export", str(model), "--outtype", "F32", "-o", str(out), "--tokenizer-pre", "smollm"]
        )
    except SystemExit as e:
        assert not e.code
    return out


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((name, f".{name}")))


@pytest.mark.parametrize("keep", [100, 0.5])
def test_truncated_gguf_is_refused_and_leaves_nothing(
    tiny_gguf: Path, tmp_path: Path, keep: float
) -> None:
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: int(keep if keep > 1 else len(data) * keep)])
    with pytest.raises(CorruptFileError, match="truncated") as e:
        gguf_to_hf(bad, tmp_path / "out")
    assert e.value.hint and "re-download or re-export" in e.value.hint
    assert _leftovers(tmp_path, "out") == []
    # An existing output folder stays as it was.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(CorruptFileError):
        gguf_to_hf(bad, tmp_path / "out")
    assert _leftovers(tmp_path, "out") == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_failure_midway_leaves_nothing(tiny_gguf: Path, tmp_path: Path) -> None:
    def stop(e: dict) -> None:
        if e["event"] == "advance" and e["completed"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gguf_to_hf(tiny_gguf, tmp_path / "out", on_event=stop)
    assert _leftovers(tmp_path, "out") == []


def test_sharded_output_loads(tiny_gguf: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("qtool.formats.folder.MAX_SHARD_BYTES", 600_000)
    s = gguf_to_hf(tiny_gguf, tmp_path / "out")
    shards = [f for f in s["files"] if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in s["files"]
    ref = llama_logits(tiny_gguf, IDS[:16])
    got = _logits(_load(tmp_path / "out"), IDS[:16])
    assert np.abs(got - ref).max() < 2e-3 * max(1.0, np.abs(ref).max())


def _rewrite_gguf(
    src: Path, dst: Path, *, arch: str | None = None, rope_freqs: np.ndarray | None = None
) -> None:
    """A copy of ``src`` with another general.architecture, or with a rope_freqs tensor."""
    import gguf

    r = gguf.GGUFReader(str(src))
    old = str(r.fields["general.architecture"].contents())
    new = arch or old
    w = gguf.GGUFWriter(str(dst), new)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key.replace(f"{old}.", f"{new}.", 1), f.contents(), vtype, sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_inputs_are_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    bert = tmp_path / "bert.gguf"
    _rewrite_gguf(tiny_gguf, bert, arch="bert")
    with pytest.raises(UnsupportedError, match="'bert' is not supported") as e:
        gguf_to_hf(bert, tmp_path / "out")
    assert e.value.hint and all(a in e.value.hint for a in ("llama", "qwen3", "gemma3", "phi3"))
    odd = tmp_path / "odd-rope.gguf"
    _rewrite_gguf(tiny_gguf, odd, rope_freqs=np.linspace(1.0, 3.0, 32))
    with pytest.raises(UnsupportedError, match="rope_freqs"):
        gguf_to_hf(odd, tmp_path / "out")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(CorruptFileError, match="not a GGUF file"):
        gguf_to_hf(junk, tmp_path / "out")
    with pytest.raises(BadInputError, match="no such file"):
        gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out")
    with pytest.raises(BadInputError, match="dtype 'int8'"):
        gguf_to_hf(tiny_gguf, tmp_path / "out", dtype="int8")
    with pytest.raises(BadInputError, match="does not exist"):
        gguf_to_hf(tiny_gguf, tmp_path / "nowhere" / "out")
    with pytest.raises(BadInputError, match="would delete"):
        gguf_to_hf(tiny_gguf, tiny_gguf.parent)
    assert tiny_gguf.is_file()
    assert _leftovers(tmp_path, "out") == []


def test_stray_files_beside_the_gguf_are_ignored(tiny_gguf: Path, tmp_path: Path) -> None:
    """transformers only sees the GGUF: a config.json with remote code beside it is not read."""
    folder = tmp_path / "src"
    folder.mkdir()
    gguf = folder / "model.gguf"
    gguf.symlink_to(tiny_gguf)
    evil = {"model_type": "llama", "auto_map": {"AutoConfig": "evil.Config"}}
    (folder / "config.json").write_text(json.dumps(evil))
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": ["evil.Tok", None]}))
    (folder / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    s = gguf_to_hf(gguf, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in cfg and s["architecture"] == "LlamaForCausalLM"
    tc = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert "auto_map" not in tc and "name_or_path" not in tc


def test_llama3_rope_factors_are_rebuilt(tiny_gguf: Path, tmp_path: Path) -> None:
    """Llama 3.1+ GGUFs carry rope_freqs (llama.cpp divides each rotary frequency by it);
    transformers' GGUF config drops it, qtool rebuilds HF's "llama3" rope_parameters."""
    from qtool.models.llama import llama3_rope_factors

    rope = {
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    gguf = tmp_path / "llama3.gguf"
    _rewrite_gguf(tiny_gguf, gguf, rope_freqs=np.asarray(llama3_rope_factors(rope, 64)))
    s = gguf_to_hf(gguf, tmp_path / "out")
    rope = s["config_added"]["rope_parameters"]
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    ids = [int(x) for x in np.random.default_rng(1).integers(3, 1024, size=480)]
    ref = llama_logits(gguf, ids)
    model = _load(tmp_path / "out")
    got = _logits(model, ids)
    # Measured: max |dlogit| 3.7e-4 (|logit| <= 1.6); with plain RoPE (the factors dropped,
    # as transformers' own GGUF loading does) 8.0e-3: only the slow dimensions are scaled.
    assert np.abs(got - ref).max() < 2e-3 * max(1.0, np.abs(ref).max())
    plain = _load(tmp_path / "out")
    plain.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    plain = type(plain)(plain.config)
    plain.load_state_dict(model.state_dict())
    assert np.abs(_logits(plain, ids) - ref).max() > 10 * np.abs(got - ref).max()


@pytest.mark.slow
def test_gemma3_asset_converts_and_matches_llamacpp(cli, assets, tmp_path: Path) -> None:
    """Gemma 3 270M Q4_K_M: norms -1, SentencePiece-style 262k vocabulary whose whitespace
    tokens are user-defined. Measured: conversion ~2 min (transformers' GGUF metadata reads);
    tokenizer equal to llama.cpp's on the Canterbury texts; logits against llama.cpp on the file
    max |dlogit| 3.03 (mean 0.19, logits up to 36, top-1 125/128: Q8_K/Q8_0 activations),
    against llama.cpp on an F32 GGUF of the converted weights 0.045, top-1 identical."""
    from transformers import AutoTokenizer

    assert assets.gemma3_gguf is not None, "run with QTOOL_TEST_GEMMA=1 (make test-slow)"
    out = tmp_path / "gemma3-hf"
    s = gguf_to_hf(assets.gemma3_gguf, out, dtype="float32")
    assert s["architecture"] == "Gemma3ForCausalLM" and s["tokenizer"]["adjusted"]
    tok = AutoTokenizer.from_pretrained(out)
    texts = [(assets.canterbury / n).read_text()[:30000] for n in ("alice29.txt", "lcet10.txt")]
    texts += ["a" + " " * k + "b" for k in (2, 5, 17, 31, 32, 58, 90)]
    for text in texts:
        assert tok(text)["input_ids"] == llama_tokenize(assets.gemma3_gguf, text, add_bos=True)
    ids = tok(texts[0][:3000])["input_ids"][:128]
    got = _logits(_load(out), ids)
    ref = llama_logits(assets.gemma3_gguf, ids)
    d = np.abs(got - ref)
    assert d.max() < 4.0 and d.mean() < 0.3
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    f32 = tmp_path / "reexport-f32.gguf"
    assert cli("export", out, "--outtype", "F32", "-o", f32).exit_code == 0
    ref32 = llama_logits(f32, ids)
    assert np.abs(got - ref32).max() < 0.1
    assert (got.argmax(-1) == ref32.argmax(-1)).all()
