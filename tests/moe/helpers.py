"""Tiny random MoE checkpoints and llama.cpp's own converter, for the MoE tests."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.export.helpers import TINY_VOCAB, small_tokenizer

LLAMA_CPP_PYTHON = "0.3.36"
SRC_CACHE = Path(
    os.environ.get("QTOOL_LLAMA_SRC_CACHE", Path.home() / ".cache" / "qtool" / "llama-src")
)

MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")


def llama_cpp_source() -> Path:
    """llama.cpp as vendored in the llama-cpp-python sdist (the library the tests run), fetched
    with pip into a cache outside git on first use. Raises RuntimeError when it cannot."""
    root = SRC_CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    SRC_CACHE.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "-d", str(SRC_CACHE), f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    tarball = SRC_CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if proc.returncode != 0 or not tarball.is_file():
        raise RuntimeError(f"pip download of the llama-cpp-python sdist failed:\n{proc.stderr}")
    with tarfile.open(tarball) as tf:
        tf.extractall(SRC_CACHE, filter="data")
    if not (root / "convert_hf_to_gguf.py").is_file():
        raise RuntimeError(f"no convert_hf_to_gguf.py in {root}")
    return root


def llama_convert(src: Path, model: Path, out: Path, outtype: str) -> None:
    """llama.cpp's convert_hf_to_gguf.py with its own gguf-py. The cut test tokenizer has no
    entry in the converter's pre-tokenizer hash table, so its pre-tokenizer is named ``smollm``
    (what it is, and what qtool is told with ``--tokenizer-pre smollm``); nothing else is
    changed."""
    script = src / "convert_hf_to_gguf.py"
    code = (
        "import runpy, sys\n"
        f"sys.path[:0] = [{str(src)!r}, {str(src / 'gguf-py')!r}]\n"
        "from conversion import base\n"
        "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'smollm'\n"
        f"sys.argv = [{str(script)!r}, {str(model)!r}, '--outtype', {outtype!r}, "
        f"'--outfile', {str(out)!r}]\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


def build_tiny_moe(
    path: Path, arch: str, tokenizer_dir: Path, *, experts: int = 4, **overrides: object
) -> Path:
    """A random 2-layer MoE of ``arch`` (hidden 256, ``experts`` experts, top-2) with the
    1024-token cut SmolLM2 tokenizer; bf16 on disk, one tensor per expert as transformers
    saves it."""
    import torch
    import transformers as tf

    common = dict(
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    configs = {
        "mixtral": lambda: tf.MixtralConfig(
            **common, intermediate_size=512, num_local_experts=experts
        ),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(
            **common,
            intermediate_size=768,
            moe_intermediate_size=256,
            shared_expert_intermediate_size=512,
            num_experts=experts,
        ),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(
            **common,
            intermediate_size=768,
            moe_intermediate_size=256,
            head_dim=64,
            num_experts=experts,
            norm_topk_prob=True,
        ),
    }
    cfg = configs[arch]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    with torch.no_grad():  # norms away from 1; routers sharp enough that routing is decisive
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.rand_like(p) * 0.5 + 0.75)
            elif n.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.normal_(0.0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    small_tokenizer(tokenizer_dir, path)
    return path
