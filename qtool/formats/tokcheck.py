"""Tokenizer fidelity of a written GGUF: the same strings through llama.cpp's tokenizer (read
from the file, ``vocab_only``) and through the Hugging Face tokenizer of the source.

A GGUF whose vocabulary or pre-tokenizer is subtly wrong loads and runs, and produces worse text
for inputs its author never tried: other scripts, code indentation, digit runs, the chat
template's markers. The strings below cover those; any difference is reported with the first
string that differs and both token lists (an error with ``--strict``). llama-cpp-python is an
optional dependency: without it the check says it did not run."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# several scripts and languages, code, whitespace runs, digits and numbers, punctuation, emoji
PROBES: tuple[str, ...] = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    " leading space, trailing space ",
    "Ça va? Größe, naïve café, smørrebrød, Łódź, İstanbul.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "我能吞下玻璃而不伤身体。天下大势，分久必合。",
    "私はガラスを食べられます。それは私を傷つけません。カタカナ",
    "나는 유리를 먹을 수 있어요. 그래도 아프지 않아요",
    "أنا قادر على أكل الزجاج و هذا لا يؤلمني.",
    "मैं काँच खा सकता हूँ और मुझे उससे कोई चोट नहीं पहुंचती",
    "ฉันกินกระจกได้ แต่มันไม่ทำให้ฉันเจ็บ",
    "emoji 🙂🚀👍🏽 and symbols → ≤ ∑ ∞ © ™",
    "def f(x):\n    if x > 0:\n\treturn x ** 2  # square\n    return -1\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "   \n\n\n    \t\t  multiple   spaces\r\n\r\n end",
    "1 12 123 1234 12345 123456 3.14159 1,000,000 0x1F 2024-12-01 10:30",
    "'s 're 've 'll 'd n't I'M YOU'RE",
    "https://example.com/path?q=1&r=2#frag user@example.org",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
)


@dataclass
class TokenizerCheck:
    ran: bool
    strings: int = 0
    differ: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None  # why it did not run

    def as_dict(self) -> dict[str, Any]:
        if not self.ran:
            return {"ran": False, "reason": self.reason}
        return {"ran": True, "strings": self.strings, "differ": len(self.differ),
                "examples": self.differ[:3]}  # fmt: skip


def probe_strings(tok: Any) -> list[str]:
    """The fixed probes plus this tokenizer's special and added tokens (inside text) and, when it
    has a chat template, a rendered conversation."""
    out = list(PROBES)
    specials = [t for t in getattr(tok, "all_special_tokens", []) if t]
    added = [t for t in (tok.get_added_vocab() or {}) if t not in specials][:16]
    for t in specials[:16] + added:
        out.append(f"before {t} after")
    if getattr(tok, "chat_template", None):
        try:
            text = tok.apply_chat_template(
                [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Hi! 2+2?"},
                    {"role": "assistant", "content": "4."},
                ],
                tokenize=False,
            )
            if isinstance(text, str):
                out.append(text)
        except Exception:  # noqa: BLE001 - templates may demand other roles; skip the probe
            pass
    return out


def check_tokenizer(gguf_path: Path, hf_folder: Path) -> TokenizerCheck:
    """Tokenize :func:`probe_strings` with llama.cpp (from ``gguf_path``) and with the HF
    tokenizer in ``hf_folder``; no special tokens added, special tokens in the text parsed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return TokenizerCheck(False, reason="llama-cpp-python is not installed")
    from transformers import AutoTokenizer

    from qtool.llamacpp import open_llama, quiet_stderr

    try:
        tok = AutoTokenizer.from_pretrained(str(hf_folder), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any tokenizer that cannot load: say so, go on
        return TokenizerCheck(False, reason=f"the source's tokenizer does not load ({e})")
    llm = open_llama(gguf_path, vocab_only=True, use_mmap=False)  # the vocabulary only: no map
    try:
        strings = probe_strings(tok)
        res = TokenizerCheck(True, strings=len(strings))
        for s in strings:
            want = list(tok.encode(s, add_special_tokens=False))
            with quiet_stderr():
                got = list(llm.tokenize(s.encode("utf-8"), add_bos=False, special=True))
            if got != want:
                k = next(
                    (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None
                )
                k = min(len(got), len(want)) if k is None else k
                res.differ.append(
                    {
                        "text": s[:80],
                        "first_difference": k,
                        "llama.cpp": got[max(0, k - 2) : k + 4],
                        "transformers": want[max(0, k - 2) : k + 4],
                    }
                )
        return res
    finally:
        with quiet_stderr():
            llm.close()
