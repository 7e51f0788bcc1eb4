"""Tokenizer -> GGUF vocabulary, as llama.cpp's converter lays it out.

Three sources, tried in order:
1. ``tokenizer.model`` (SentencePiece): model ``llama``, pieces with their scores and types.
2. ``tokenizer.json`` of a SentencePiece-style BPE (``byte_fallback``, as Gemma's or a
   GGUF-converted tokenizer): model ``llama``. Its scores were lost in conversion; they are
   rebuilt from the merge order (a piece's score is minus the rank of the first merge that
   makes it), which gives llama.cpp's SentencePiece merger the same priorities HF's BPE has.
3. A byte-level BPE ``tokenizer.json`` (GPT-2 style): model ``gpt2`` with merges, and the
   pre-tokenizer named the way llama.cpp's converter names it, by hashing the ids of a fixed
   check text (``get_vocab_base_pre``).
Special tokens, add-BOS/EOS flags and the chat template come through gguf-py's ``SpecialVocab``.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf
from gguf import GGUFWriter

from qtool.errors import UnsupportedError

# llama.cpp's check text for pre-tokenizer identification (convert_hf_to_gguf.py,
# get_vocab_base_pre): the ids a tokenizer gives it identify its pre-tokenizer.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# sha256(str(ids)) -> llama.cpp pre-tokenizer name, for the tokenizers of the supported
# architectures (values from llama.cpp's table).
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
}

TT = gguf.TokenType


def write_vocab(
    w: GGUFWriter, folder: Path, cfg: dict[str, Any], *, tokenizer_pre: str | None = None
) -> dict[str, Any]:
    """Add the tokenizer to ``w``; return a summary (model, pre, size) for reports."""
    vocab_size = int(cfg.get("vocab_size") or 0)
    tokens: list[bytes] | list[str]
    scores: list[float] | None
    if (folder / "tokenizer.model").is_file():
        tokens, scores, types = _sentencepiece(folder, vocab_size)
        model, pre = "llama", "default"
    elif (folder / "tokenizer.json").is_file():
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        if data["model"]["type"] == "BPE" and data["model"].get("byte_fallback"):
            tokens, scores, types = _spm_style_bpe(folder, data, vocab_size)
            model, pre = "llama", "default"
        elif data["model"]["type"] == "BPE":
            tokens, types, pre = _byte_level_bpe(folder, vocab_size, tokenizer_pre)
            scores, model = None, "gpt2"
        else:
            raise UnsupportedError(
                f"{folder}: tokenizer model {data['model']['type']!r} cannot be converted to GGUF",
                hint="supported: SentencePiece (tokenizer.model) and BPE tokenizer.json",
            )
    else:
        raise UnsupportedError(
            f"{folder}: no tokenizer (tokenizer.model or tokenizer.json)",
            hint="copy the base model's tokenizer files into the checkpoint folder",
        )
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if scores is not None:
        w.add_token_scores(scores)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=len(tokens))
    add_bos = _adds_bos(folder)
    if add_bos is not None:
        special.add_special_token["bos"] = add_bos
    prefix_key = gguf.Keys.Tokenizer.ADD_PREFIX
    written = any(prefix_key in kv for kv in w.kv_data)  # a family's own rule (Gemma) wins
    if model == "llama" and (folder / "tokenizer.json").is_file() and not written:
        w.add_add_space_prefix(_adds_space_prefix(folder))
    special.add_to_gguf(w, quiet=True)
    return {"model": model, "pre": pre, "tokens": len(tokens)}


def _sentencepiece(folder: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(folder / "tokenizer.model"))
    n = max(vocab_size, sp.vocab_size())
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [int(TT.UNUSED)] * n
    for i in range(sp.vocab_size()):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = int(
            TT.UNKNOWN
            if sp.IsUnknown(i)
            else TT.CONTROL
            if sp.IsControl(i)
            else TT.UNUSED
            if sp.IsUnused(i)
            else TT.BYTE
            if sp.IsByte(i)
            else TT.NORMAL
        )
    _apply_added_tokens(folder, tokens, scores, types)
    return tokens, scores, types


def _spm_style_bpe(
    folder: Path, data: dict[str, Any], vocab_size: int
) -> tuple[list[bytes], list[float], list[int]]:
    vocab: dict[str, int] = data["model"]["vocab"]
    n = max(vocab_size, len(vocab))
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-1000.0] * n
    types = [int(TT.UNUSED)] * n
    rank: dict[str, int] = {}
    for r, merge in enumerate(data["model"].get("merges", [])):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(a + b, r)
    for piece, i in vocab.items():
        if i >= n:
            continue
        tokens[i] = piece.encode("utf-8")
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types[i], scores[i] = int(TT.BYTE), 0.0
        else:
            types[i] = int(TT.NORMAL)
            scores[i] = -float(rank.get(piece, len(rank)))
    unk = data["model"].get("unk_token")
    if unk in vocab and vocab[unk] < n:
        types[vocab[unk]] = int(TT.UNKNOWN)
    _apply_added_tokens(folder, tokens, scores, types)
    return tokens, scores, types


def _apply_added_tokens(
    folder: Path, tokens: list[bytes], scores: list[float], types: list[int]
) -> None:
    """Special and user-defined tokens from tokenizer.json / tokenizer_config.json."""
    added: list[dict[str, Any]] = []
    tj, tc = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if tj.is_file():
        added += json.loads(tj.read_text(encoding="utf-8")).get("added_tokens", [])
    if tc.is_file():
        for tid, tok in (
            json.loads(tc.read_text(encoding="utf-8")).get("added_tokens_decoder", {}).items()
        ):
            added.append({"id": int(tid), **tok})
    for tok in added:
        i = int(tok["id"])
        if i >= len(tokens):
            continue
        text: str = tok["content"]
        if tok.get("special") or _looks_special(text):
            types[i] = int(TT.CONTROL)
        else:
            text = text.replace("\u2581", " ")  # llama.cpp wants user-defined spaces normalised
            types[i] = int(TT.USER_DEFINED)
        tokens[i] = text.encode("utf-8")
        scores[i] = -1000.0


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or (
        text.startswith("<")
        and text.endswith(">")
        and len(text) > 2
        and " " not in text
        and not text.startswith("<0x")
    )


def _byte_level_bpe(
    folder: Path, vocab_size: int, tokenizer_pre: str | None
) -> tuple[list[str], list[int], str]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab: dict[str, int] = tok.get_vocab(with_added_tokens=True)
    n = max(vocab_size, max(vocab.values()) + 1)
    reverse = {i: t for t, i in vocab.items()}
    added = {a.content: a for a in tok.get_added_tokens_decoder().values()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(TT.UNUSED))
            continue
        t = reverse[i]
        if t in added:
            special = added[t].special or _looks_special(t)
            types.append(int(TT.CONTROL if special else TT.USER_DEFINED))
        else:
            types.append(int(TT.NORMAL))
        tokens.append(t)
    pre = tokenizer_pre or identify_pre_tokenizer(folder / "tokenizer.json")
    return tokens, types, pre


def identify_pre_tokenizer(tokenizer_json: Path) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, from the hash of the
    ids its tokenizer.json gives llama.cpp's check text (special tokens added as usual)."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_json)).encode(CHECK_TEXT).ids
    digest = sha256(str(ids).encode()).hexdigest()
    try:
        return PRE_TOKENIZERS[digest]
    except KeyError:
        raise UnsupportedError(
            "the tokenizer's pre-tokenizer is not recognised (llama.cpp's check-text hash "
            f"chkhsh {digest})",
            hint="pass --tokenizer-pre NAME with the llama.cpp pre-tokenizer it matches "
            f"(known here: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}; llama.cpp's "
            "convert_hf_to_gguf.py lists the others by chkhsh; the tokenizer check after "
            "writing then shows whether it matches)",
        ) from None


def _adds_bos(folder: Path) -> bool | None:
    """Whether the tokenizer prepends BOS: probed on tokenizer.json's post-processor, since
    configs often leave it implicit."""
    tj, tc = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not tj.is_file():
        return None
    from tokenizers import Tokenizer

    bos = None
    if tc.is_file():
        bos = json.loads(tc.read_text(encoding="utf-8")).get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
    tok = Tokenizer.from_file(str(tj))
    bos_id = tok.token_to_id(bos) if bos else None
    if bos_id is None:
        return False
    ids = tok.encode("a").ids
    return bool(ids) and ids[0] == bos_id


def _adds_space_prefix(folder: Path) -> bool:
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    norm = json.dumps(data.get("normalizer")) + json.dumps(data.get("pre_tokenizer"))
    return '"Prepend"' in norm or '"prepend_scheme": "always"' in norm
