"""Tiny random MoE checkpoints and llama.cpp's own converter, for the MoE tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.export.helpers import TINY_VOCAB, small_tokenizer

MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")


def sparse_safetensors(
    path: Path, cfg: dict, tensors: dict[str, tuple[str, tuple[int, ...]]]
) -> None:
    """``path/config.json`` and a model.safetensors of ``tensors`` ({name: (dtype, shape)},
    dtypes BF16 or U8) whose data is a hole: the header written, the file truncated to its full
    size, so a real-size checkpoint takes no disk."""
    import json
    import struct

    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    header: dict[str, object] = {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = {"BF16": 2, "U8": 1}[dtype]
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


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


def converter_pair(
    src: Path, model: Path, f32: Path, outtype: str, tmp: Path, export: Callable[..., None]
) -> tuple[Path, Path]:
    """(llama.cpp's converter output, qtool's) for ``outtype``: the converter run on ``model``;
    qtool's F32 file given (``f32``), any other type exported by ``export(model, out, type)``."""
    ref = tmp / f"ref-{outtype}.gguf"
    llama_convert(src, model, ref, outtype.lower())
    if outtype == "F32":
        return ref, f32
    mine = tmp / f"qtool-{outtype}.gguf"
    export(model, mine, outtype)
    return ref, mine


def moe_layer(path: Path) -> tuple[Any, Any, Any]:
    """(checkpoint, decoder layer 1 with its weights loaded in float32, its MoE block) as the
    layer runner builds them."""
    import torch

    from qtool.checkpoint import open_checkpoint
    from qtool.runner.layers import WeightLoader, _parts, build_skeleton
    from qtool.runner.moe import MoEBlock

    ckpt = open_checkpoint(str(path))
    layer = _parts(build_skeleton(ckpt, torch.float32)).layers[1]
    assert isinstance(layer.mlp, MoEBlock)
    WeightLoader(ckpt, torch.device("cpu"), torch.float32).load(layer, "model.layers.1.")
    return ckpt, layer, layer.mlp


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


# gpt-oss's YaRN as released (factor 32 over 4096 positions, betas 32 / 1), with ``truncate``
# true: llama.cpp always rounds the correction range (see test_gpt_oss_gguf.py for false).
GPT_OSS_YARN = {
    "rope_type": "yarn",
    "rope_theta": 150000.0,
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": True,
    "original_max_position_embeddings": 4096,
}


def build_tiny_gpt_oss(
    path: Path, tokenizer_dir: Path, *, mxfp4: bool = False, **overrides: object
) -> Path:
    """A random 2-layer gpt-oss (hidden 256, 4 experts of 256, top-2; layer 0 sliding over 16
    tokens, layer 1 full; YaRN; sinks and every bias non-zero) with the cut SmolLM2 tokenizer.

    Weights are scaled so that every feature shows in the logits: expert pre-activations of a
    few units, so the SwiGLU clamp at 7 is reached; sinks of the attention logits' own size.
    ``mxfp4``: the experts as OpenAI releases them instead (``*_blocks`` / ``*_scales``: random
    E2M1 codes and E8M0 exponents, ``quantization_config: mxfp4``), the other tensors bf16."""
    import torch
    import transformers as tf
    from safetensors.torch import load_file, save_file

    cfg = tf.GptOssConfig(
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=131072,
        sliding_window=16,
        rope_parameters=dict(GPT_OSS_YARN),
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(torch.rand_like(p) * 0.5 + 0.75)
            elif n.endswith("sinks"):
                p.normal_(0.0, 1.0)
            elif n.endswith("router.weight"):
                p.normal_(0.0, 0.2)
            elif n.endswith("experts.gate_up_proj"):
                p.normal_(0.0, 0.3)
            elif n.endswith("experts.down_proj"):
                p.normal_(0.0, 0.05)
            elif p.ndim == 1 or n.endswith("_bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    small_tokenizer(tokenizer_dir, path)
    if mxfp4:
        _to_mxfp4(path, load_file, save_file)
    return path


def _to_mxfp4(path: Path, load_file: object, save_file: object) -> None:
    """Replace the saved float experts with random MXFP4 ones in the release's layout:
    ``<proj>_blocks`` uint8 [E, out, in/32, 16] (two E2M1 codes a byte, the even weight in the
    low nibble) and ``<proj>_scales`` uint8 [E, out, in/32] (E8M0 exponents)."""
    import json

    import torch

    files = sorted(path.glob("*.safetensors"))
    assert len(files) == 1, files
    tensors = load_file(files[0])  # type: ignore[operator]
    g = torch.Generator().manual_seed(1)
    out = {}
    for name, t in tensors.items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[name] = t
            continue
        e, n_in, n_out = t.shape  # input-major, as transformers holds them
        exp = 123 if name.endswith("gate_up_proj") else 121  # weights up to 6 * 2^(exp-127)
        blocks = torch.randint(0, 256, (e, n_out, n_in // 32, 16), generator=g, dtype=torch.uint8)
        scales = torch.randint(exp - 1, exp + 2, (e, n_out, n_in // 32), generator=g)
        out[name + "_blocks"] = blocks
        out[name + "_scales"] = scales.to(torch.uint8)
    save_file(out, files[0], metadata={"format": "pt"})  # type: ignore[operator]
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


# Metadata qtool writes differently on purpose: general.name (the converter title-cases the
# folder name), general.size_label / general.type (the converter's model-card fields),
# general.quantization_version (the converter writes it on float files too; qtool when a tensor
# is quantized, as llama-quantize does), tokenizer.ggml.add_bos_token (qtool records the
# tokenizer's own False; the converter leaves it out for this tokenizer), qtool.recipe.
INTENDED = {
    "general.name",
    "general.size_label",
    "general.type",
    "general.quantization_version",
    "tokenizer.ggml.add_bos_token",
    "qtool.recipe",
}


def _kv(path: Path) -> dict[str, object]:
    from gguf import GGUFReader

    return {
        f.name: f.contents()
        for f in GGUFReader(str(path)).fields.values()
        if not f.name.startswith("GGUF.")
    }


def assert_same_as_converter(ref: Path, mine: Path) -> dict[str, object]:
    """qtool's GGUF ``mine`` against the converter's ``ref``: the same tensors (names, types,
    bytes, shapes) and metadata but :data:`INTENDED`; returns qtool's metadata."""
    from gguf import GGUFReader

    from tests.export.helpers import compare_files

    types, data = compare_files(ref, mine)  # same names (asserted), types, bytes
    assert not types and not data, (types, data)
    shapes = {t.name: list(t.shape) for t in GGUFReader(str(ref)).tensors}
    assert shapes == {t.name: list(t.shape) for t in GGUFReader(str(mine)).tensors}
    a, b = _kv(ref), _kv(mine)
    diff = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert diff <= INTENDED, sorted(diff - INTENDED)
    return b
