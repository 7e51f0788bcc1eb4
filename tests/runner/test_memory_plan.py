"""The memory plan's arithmetic (:mod:`qtool.runner.memory`), and the memory savings it relies on
giving the same bits as before."""

from __future__ import annotations

import pytest
import torch

from qtool.methods.gptq import _inverse_cholesky_here
from qtool.observers.stats import HessianAccumulator
from qtool.runner import memory
from qtool.runner.memory import Shape, current_rss, plan_memory, release_freed

MIB = 1 << 20


def _llama_1b(layers: int = 1) -> Shape:
    """Llama 3.2 1B's widths: hidden 2048, intermediate 8192, 8 KV heads of 64, vocab 128256."""
    h, ff, kv = 2048, 8192, 512
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (ff, h), (ff, h), (h, ff)]
    return Shape(
        layers=layers,
        hidden=h,
        intermediate=ff,
        heads=32,
        vocab=128256,
        layer_params=sum(r * c for r, c in shapes) + 2 * h,
        embed_params=128256 * h,
        linear_inputs=[c for _, c in shapes],
        linear_shapes=shapes,
        embed_stored_bytes=128256 * h * 2,
        model_type="llama",
    )


def _plan(shape: Shape, **kw):
    args = dict(tokens=8 * 512, batch_tokens=512, seq_len=512, dtype_bytes=2, dtype="bfloat16",
                device="cpu", gptq=True, base_rss=0)  # fmt: skip
    return plan_memory(shape, **{**args, **kw})


def test_gptq_layer_counts_the_larger_of_collecting_and_solving() -> None:
    """At 1B widths the down projection's 8192-column Hessian is collected in a float32 batch
    sum (4 bytes an entry; the Hessian is read out over it), a buffer of 2048 input rows (float32)
    and a float64 exact pair of its 10
    upper blocks of 4 x 4 (the accumulator's own storage), plus one 2048 x 2048 block's three
    float64 temporaries; solving it (Hessian + the one matrix its inverse's factor is made in
    + the float32 weight, its working copy and int32 codes, 704 MiB) is smaller, so only the
    collection counts."""
    p = _plan(_llama_1b())
    items = {i.what: i.bytes for i in p.items}
    c = 8192
    acc = HessianAccumulator(c, torch.device("meta"))
    acc.add(torch.ones(1, c, dtype=torch.bfloat16, device="meta"))
    acc.end_group()
    assert acc.hi is not None and acc.lo is not None and acc._buf is not None
    pair = acc.hi.numel() * 8 + acc.lo.numel() * 8
    assert pair == 16 * c * c * 10 // 16
    rows = acc._buf.numel() * acc._buf.element_size()  # the input rows waiting for a product
    assert rows == 2048 * c * 4
    got = items["GPTQ: collecting a 8192-column Hessian"]
    assert got == acc.sum.numel() * 4 + rows + pair + 24 * 2048 * 2048
    assert items["GPTQ: the layer's finished codes"] == _llama_1b().layer_params
    assert not any("solv" in w for w in items)
    # the embedding pass (0.5 GiB in bf16) is below a GPTQ layer here: not added on top
    assert not any("embedding" in w for w in items)
    assert p.host_peak == sum(items.values())


def test_solving_dominates_for_few_columns_and_many_rows() -> None:
    """A 32768 x 1024 linear: collecting 1024 columns is 20 MiB + a block; solving holds the
    error reports' six float32 copies of the weight beside the Hessian (24 rows c + 4 c^2)."""
    s = _llama_1b()
    s.linear_shapes, s.linear_inputs = [(32768, 1024)], [1024]
    items = {i.what: i.bytes for i in _plan(s).items}
    assert items["GPTQ: solving a 32768x1024 linear"] == 24 * 32768 * 1024 + 4 * 1024 * 1024


def test_embedding_pass_is_a_peak_of_its_own() -> None:
    """The embedding pass comes before any layer: it raises the plan only by what it holds above
    a layer (as stored plus the compute-dtype copy when they differ), never by all of it."""
    s = _llama_1b()
    s.linear_shapes, s.linear_inputs = [(256, 256)], [256]
    s.layer_params = 256 * 256
    stat = _plan(s, gptq=False, dtype_bytes=4, dtype="float32")
    layer = sum(i.bytes for i in stat.items if not i.what.startswith(("hidden", "embedding")))
    above = next(i.bytes for i in stat.items if i.what.startswith("embedding"))
    assert above == 128256 * 2048 * (4 + 2) - layer


def test_hessian_read_out_over_its_sum_is_the_same_matrix() -> None:
    g = torch.Generator().manual_seed(3)
    for cols in (48, 700, 1100):
        a, b = (HessianAccumulator(cols, torch.device("cpu")) for _ in range(2))
        for k in range(5):
            x = torch.randn(37, cols, generator=g) * 10.0 ** (k % 3 - 1)
            for acc in (a, b):
                acc.add(x)
                if k % 2:
                    acc.end_group()
        kept, released = a.hessian(), b.hessian(release=True)
        assert torch.equal(kept, released)
        assert b.hi is None and b.lo is None and b.sum.numel() == 0 and b.rows == a.rows


def test_dampened_factor_without_an_identity_matrix_is_the_same_bits() -> None:
    """``H + d I`` built on H's copy (diagonal added in place) is ``H + (d * eye)`` bit for bit,
    signed zeros off the diagonal included."""

    def reference(h: torch.Tensor, damp: float) -> torch.Tensor:
        eye = torch.eye(h.shape[0])
        hd = h + (damp * float(torch.mean(torch.diag(h)))) * eye
        lower = torch.linalg.cholesky(hd)
        return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)

    g = torch.Generator().manual_seed(1)
    for n in (5, 64, 257):
        x = torch.randn(2 * n, n, generator=g)
        x[x.abs() < 0.3] = 0.0
        x[: n // 2] *= -1
        h = (x.T @ x) * (2 / (2 * n))
        h[h == 0] = -0.0
        for damp in (0.01, 0.1):
            got, used = _inverse_cholesky_here(h.clone, damp, "w")
            assert used == damp
            assert torch.equal(got.view(torch.int32), reference(h, damp).view(torch.int32))


def test_release_freed_gives_back_freed_heap_pages() -> None:
    """Blocks freed between kept ones stay resident in glibc's heap until trimmed."""
    if memory._malloc_trim() is None:
        pytest.skip("not glibc")

    def touched(n: int) -> bytearray:
        b = bytearray(n)
        b[::4096] = b"\1" * len(range(0, n, 4096))
        return b

    big = touched(8 << 20)
    del big  # a freed mapped block raises glibc's mmap threshold past 1 MiB
    blocks = [touched(1 << 20) for _ in range(64)]
    kept = blocks[::2]
    del blocks  # 32 MiB freed in holes between the kept blocks
    before = current_rss()
    release_freed()
    assert before - current_rss() > 16 << 20
    assert len(kept) == 32


def test_peak_rss_is_the_process_own_not_its_parents() -> None:
    """qtool's reported peak (``peak_rss``, VmHWM) is its own even when a large process started
    it: ``ru_maxrss`` of a child ``vfork``-ed by Python's subprocess carries the parent's
    high-water mark over ``exec`` (the pytest process measured a 0.8 GiB calibrate at 4.7 GiB)."""
    import subprocess
    import sys

    big = bytearray(768 << 20)
    big[::4096] = b"\1" * len(range(0, len(big), 4096))  # touched: resident
    code = (
        "import resource; from qtool.runner.memory import peak_rss;"
        "print(peak_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    own, maxrss = map(int, out.stdout.split())
    del big
    assert own < 400 * MIB, (own, maxrss)  # an interpreter with torch imported, not 768 MiB more
    print(f"peak_rss {own / MIB:.0f} MiB, ru_maxrss {maxrss / MIB:.0f} MiB")
