"""The streaming safetensors writer (:mod:`qtool.formats.streamed`) and the folder writer's
shards: byte for byte what ``safetensors.torch.save_file`` writes, read back equal, one tensor
held at a time, nothing left behind on failure."""

from __future__ import annotations

import errno
import gc
import json
import sys
import weakref
from pathlib import Path

import pytest
import torch

from qtool.formats import streamed
from qtool.formats.folder import _Shards
from qtool.formats.streamed import SafetensorsFile


def _mixed() -> dict[str, torch.Tensor]:
    """Every dtype family qtool writes and then some, in an order safetensors re-sorts: several
    of one dtype, 0-d, empty and non-contiguous tensors, names that need JSON escapes."""
    g = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {
        "model.layers.1.mlp.down_proj.qweight": torch.randint(
            -(2**31), 2**31 - 1, (24, 40), dtype=torch.int32, generator=g
        ),
        "model.layers.1.mlp.down_proj.scales": torch.randn(3, 40, generator=g).half(),
        "model.layers.0.mlp.down_proj.qweight": torch.randint(
            0, 2**31 - 1, (8, 16), dtype=torch.int32, generator=g
        ),
        "model.norm.weight": torch.randn(64, generator=g).bfloat16(),
        "lm_head.weight": torch.randn(32, 64, generator=g),
        "codes": torch.randint(0, 256, (7, 5), dtype=torch.uint8, generator=g),
        "signed": torch.randint(-128, 128, (11,), dtype=torch.int8, generator=g),
        "g_idx": torch.arange(96, dtype=torch.int64).flip(0),
        "scalar_f32": torch.tensor(3.5),
        "scalar_i64": torch.tensor(-7, dtype=torch.int64),
        "empty_f16": torch.empty(0, 4, dtype=torch.float16),
        "empty_i32": torch.empty(3, 0, dtype=torch.int32),
        "transposed": torch.randn(6, 10, generator=g).t(),  # not contiguous
        "mask": torch.rand(9, generator=g) > 0.5,
        "i16": torch.randint(-(2**15), 2**15, (5,), dtype=torch.int16, generator=g),
        "f64": torch.randn(4, 3, generator=g).double(),
        "c64": torch.randn(5, generator=g, dtype=torch.complex64),
        'quote"back\\slash/é\x01': torch.ones(2),
        "A_upper_sorts_first": torch.zeros(3),
    }
    for name in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2"):
        dt = getattr(torch, name, None)
        if isinstance(dt, torch.dtype):
            src = torch.randint(0, 100, (6,), generator=g)
            t[name] = src.to(dt) if "float8" in name else src.to(torch.int32).to(dt)
    return t


def _reference(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None) -> bytes:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path.read_bytes()


def _streamed(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None) -> bytes:
    f = SafetensorsFile(path, metadata)
    for name, t in tensors.items():
        f.add(name, t)
    f.close()
    assert not f.spool_path.exists()
    return path.read_bytes()


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None])
def test_bytes_identical_to_save_file(tmp_path: Path, metadata: dict | None) -> None:
    tensors = _mixed()
    ref = _reference(tensors, tmp_path / "ref.safetensors", metadata)
    assert _streamed(tensors, tmp_path / "out.safetensors", metadata) == ref
    # in another arrival order too: the file is the same
    rev = dict(reversed(tensors.items()))
    assert _streamed(rev, tmp_path / "rev.safetensors", metadata) == ref


def test_reads_back_equal(tmp_path: Path) -> None:
    from safetensors import safe_open

    tensors = _mixed()
    _streamed(tensors, tmp_path / "out.safetensors", {"format": "pt"})
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape, name
            raw = t.contiguous().reshape(-1).view(torch.uint8)
            assert torch.equal(got.reshape(-1).view(torch.uint8), raw), name


def test_no_tensors_and_one_empty(tmp_path: Path) -> None:
    meta = {"format": "pt"}
    assert _streamed({}, tmp_path / "a", meta) == _reference({}, tmp_path / "ra", meta)
    one = {"e": torch.empty(0)}
    assert _streamed(one, tmp_path / "b", meta) == _reference(one, tmp_path / "rb", meta)


def test_copy_without_copy_file_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel cannot copy between the files, the buffered copy writes the same bytes,
    in pieces of at most ``_CHUNK``."""

    def cross_device(*a: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(streamed.os, "copy_file_range", cross_device, raising=False)
    monkeypatch.setattr(streamed, "_CHUNK", 100)
    tensors = _mixed()
    ref = _reference(tensors, tmp_path / "ref.safetensors", {"format": "pt"})
    assert _streamed(tensors, tmp_path / "out.safetensors", {"format": "pt"}) == ref


def test_big_endian_host_matches_save_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a big-endian host both swap each element (complex64: each part) to little-endian."""
    tensors = {k: v for k, v in _mixed().items() if not k.startswith(("uint", "float8"))}
    monkeypatch.setattr(sys, "byteorder", "big")
    ref = _reference(tensors, tmp_path / "ref.safetensors", {"format": "pt"})
    out = _streamed(tensors, tmp_path / "out.safetensors", {"format": "pt"})
    monkeypatch.undo()
    assert out == ref
    assert out != _reference(tensors, tmp_path / "le.safetensors", {"format": "pt"})


def test_holds_no_tensor(tmp_path: Path) -> None:
    """A tensor added is not referenced afterwards: memory stays at the one being written."""
    f = SafetensorsFile(tmp_path / "out.safetensors")
    t = torch.randn(256, 256)
    ref = weakref.ref(t)
    f.add("w", t)
    del t
    gc.collect()
    assert ref() is None
    f.close()


def test_refusals(tmp_path: Path) -> None:
    f = SafetensorsFile(tmp_path / "out.safetensors")
    f.add("w", torch.ones(2))
    with pytest.raises(ValueError, match="added twice"):
        f.add("w", torch.ones(2))
    with pytest.raises(ValueError, match="sparse"):
        f.add("s", torch.eye(2).to_sparse())
    f.discard()
    assert not list(tmp_path.iterdir())


def test_failed_close_removes_the_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*a: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(streamed, "_copy_range", full)
    f = SafetensorsFile(tmp_path / "out.safetensors")
    f.add("w", torch.ones(2))
    with pytest.raises(OSError, match="No space"):
        f.close()
    assert not f.spool_path.exists()


def _old_shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """The shards the buffering writer made: a new one before a tensor that would cross
    ``limit`` bytes, unless the current one is empty."""
    parts: list[dict[str, torch.Tensor]] = []
    pending: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if pending and size + n > limit:
            parts.append(pending)
            pending, size = {}, 0
        pending[name] = t
        size += n
    return [*parts, pending] if pending else parts


@pytest.mark.parametrize("limit", [10**9, 2000, 700, 1])
def test_shards_and_index_as_before(tmp_path: Path, limit: int) -> None:
    """The folder writer's shards are the files ``save_file`` made of the same split (a tensor
    over the limit gets a shard of its own), with the same names and index."""
    tensors = _mixed()
    out, ref = tmp_path / "out", tmp_path / "ref"
    out.mkdir()
    ref.mkdir()
    shards = _Shards(out, limit)
    for name, t in tensors.items():
        shards.add(name, t)
    files = shards.finish()

    parts = _old_shards(tensors, limit)
    n = len(parts)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    for name, part in zip(names, parts, strict=True):
        _reference(part, ref / name, {"format": "pt"})
    if n > 1:
        weight_map = {t: name for name, part in zip(names, parts, strict=True) for t in part}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (ref / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        names.append("model.safetensors.index.json")
    assert files == names
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    if limit == 1:  # a shard each, but the two empty tensors share one
        assert n == len(tensors) - 1
