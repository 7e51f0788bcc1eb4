"""Streaming metrics: perplexity, and KL divergence / top-1 / Δp against the base model.

Everything is accumulated slice by slice of scored positions; only one float per scored token
(its KL divergence, for the median and p99) is kept. The definitions follow llama.cpp's
``llama-perplexity --kl-divergence`` (tools/perplexity/perplexity.cpp, ``kl_divergence``):

- KLD(t) = sum_v p_base(v) * (log p_base(v) - log p_art(v)), the base being the reference;
- top-1 agreement: argmax of the artifact's logits equals the base's;
- Δp: p_art(correct token) - p_base(correct token), averaged.

How it is computed, so that tiny divergences (F16 against F32 weights, ~1e-6 nats) survive
without float64 passes over the vocabulary. With d = z_base - z_art (float32 logits) and
p = p_base, two exact identities hold:

    lse_art = lse_base + log(sum_v p_v exp(-d_v))
    KLD     = sum_v p_v d_v + log1p(sum_v p_v expm1(-d_v))

Both sums are float32 products accumulated in float64; ``expm1`` keeps full relative precision
for small d, so the cancellation between the two terms costs nothing measurable (relative error
~1e-5 at KLD 1e-6, see the tests against a float64 log-softmax). Identical logits give d = 0
and exactly 0. Rows where the artifact puts a logit far above the base's (``-d > 40`` nats,
where ``p_v`` may underflow while ``exp(-d_v)`` carries the mass) or with non-finite logits go
through a float64 log-softmax instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# exp(40) ~ 2e17: p_v * expm1(-d_v) stays far from float32 overflow, and a p_v lost to
# underflow (z_v - lse < -87) cannot hide an artifact mass above exp(-47).
FALLBACK_GAP = 40.0


@dataclass
class PerplexityStats:
    """Sum of negative log-likelihoods of the correct tokens."""

    nll_sum: float = 0.0
    nll_sq_sum: float = 0.0
    count: int = 0

    def add(self, nll: Any) -> None:
        self.nll_sum += float(nll.sum())
        self.nll_sq_sum += float((nll * nll).sum())
        self.count += int(nll.numel())

    def to_state(self) -> dict[str, Any]:
        """The accumulators, exactly (Python floats are float64; JSON keeps every bit)."""
        return {"nll_sum": self.nll_sum, "nll_sq_sum": self.nll_sq_sum, "count": self.count}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> PerplexityStats:
        return cls(float(d["nll_sum"]), float(d["nll_sq_sum"]), int(d["count"]))

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.count if self.count else math.nan

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll) if self.count else math.nan

    @property
    def ppl_stderr(self) -> float:
        """Standard error of the PPL estimate (delta method, as perplexity.cpp prints ±)."""
        if self.count < 2:
            return math.nan
        m = self.mean_nll
        var = max(self.nll_sq_sum / self.count - m * m, 0.0)
        return self.ppl * math.sqrt(var / (self.count - 1))


@dataclass
class CompareStats:
    """An artifact against the base on the same positions."""

    ppl: PerplexityStats = field(default_factory=PerplexityStats)
    kld_parts: list[np.ndarray] = field(default_factory=list)
    top1: int = 0
    dp_sum: float = 0.0
    count: int = 0

    def kld(self) -> np.ndarray:
        return np.concatenate(self.kld_parts) if self.kld_parts else np.zeros(0)

    def to_state(self, parts: int | None = None) -> tuple[dict[str, Any], np.ndarray]:
        """(the scalar accumulators, every KLD so far as float64); ``parts``: only the first
        that many KLD slices."""
        kept = self.kld_parts if parts is None else self.kld_parts[:parts]
        kld = np.concatenate(kept).astype(np.float64) if kept else np.zeros(0, np.float64)
        scalars = {
            "ppl": self.ppl.to_state(),
            "top1": self.top1,
            "dp_sum": self.dp_sum,
            "count": self.count,
        }
        return scalars, kld

    @classmethod
    def from_state(cls, d: dict[str, Any], kld: np.ndarray) -> CompareStats:
        return cls(
            PerplexityStats.from_state(d["ppl"]),
            [np.asarray(kld, dtype=np.float64)] if len(kld) else [],
            int(d["top1"]),
            float(d["dp_sum"]),
            int(d["count"]),
        )

    def summary(self) -> dict[str, Any]:
        k = self.kld()
        n = max(self.count, 1)
        return {
            "ppl": self.ppl.ppl,
            "ppl_stderr": self.ppl.ppl_stderr,
            "kld": {
                "mean": float(k.mean()) if k.size else math.nan,
                "median": float(np.median(k)) if k.size else math.nan,
                "p99": float(np.percentile(k, 99)) if k.size else math.nan,
                "max": float(k.max()) if k.size else math.nan,
                "stderr": float(k.std(ddof=1) / math.sqrt(k.size)) if k.size > 1 else math.nan,
            },
            "top1": self.top1 / n,
            "delta_p_mean": self.dp_sum / n,
            "tokens": self.count,
        }


@dataclass
class BaseSlice:
    """The base model's side of one slice of positions, shared by every artifact."""

    logits: Any  # float32 (rows, vocab)
    lse: Any  # float64 (rows,): log-sum-exp of the logits
    p: Any  # float32 (rows, vocab): softmax
    nll: Any  # float64 (rows,): -log p(correct token)
    argmax: Any  # (rows,)
    finite: bool  # no inf/nan logits (else every comparison takes the float64 path)


def _target(x: Any, targets: Any) -> Any:
    return x.gather(-1, targets[:, None])[:, 0]


def base_slice(stats: PerplexityStats, logits: Any, targets: Any) -> BaseSlice:
    """Softmax of the base's logits for one slice; adds the slice to the base's perplexity."""
    import torch

    z = logits.float()
    finite = bool(torch.isfinite(z).all())
    m = z.amax(-1, keepdim=True)
    e = torch.exp(z - m)
    s = e.sum(-1, dtype=torch.float64)
    lse = m[:, 0].double() + s.log()
    p = e.div_(s[:, None].float())
    nll = lse - _target(z, targets).double()
    stats.add(nll)
    return BaseSlice(z, lse, p, nll, z.argmax(-1), finite)


def _exact(base_logits: Any, art_logits: Any) -> tuple[Any, Any]:
    """(KLD, lse_art) rows through a float64 log-softmax: the reference formula."""
    import torch

    lb = torch.log_softmax(base_logits.double(), -1)
    za = art_logits.double()
    lse_a = torch.logsumexp(za, -1)
    la = za - lse_a[:, None]
    pb = lb.exp()
    terms = torch.where(pb > 0, pb * (lb - la), torch.zeros_like(lb))  # 0 * log 0 = 0
    return terms.sum(-1), lse_a


def update_compare(stats: CompareStats, base: BaseSlice, art_logits: Any, targets: Any) -> None:
    """Add one slice of positions: the artifact's perplexity and its divergence from the base."""
    import torch

    za = art_logits.float()
    d = base.logits - za
    gap = (-d).amax(-1)
    ed = (base.p * d).sum(-1, dtype=torch.float64)
    torch.neg(d, out=d)
    torch.expm1(d, out=d)
    u = (base.p * d).sum(-1, dtype=torch.float64)
    del d
    log_ratio = torch.log1p(u)  # lse_art - lse_base
    kld = ed + log_ratio
    lse_a = base.lse + log_ratio
    redo = ~torch.isfinite(kld) | (gap > FALLBACK_GAP) | ~torch.isfinite(gap)
    if not base.finite:
        redo[:] = True
    if bool(redo.any()):
        kld[redo], lse_a[redo] = _exact(base.logits[redo], za[redo])
    nll = lse_a - _target(za, targets).double()
    stats.ppl.add(nll)
    stats.kld_parts.append(kld.cpu().numpy())
    stats.top1 += int((base.argmax == za.argmax(-1)).sum())
    stats.dp_sum += float((torch.exp(-nll) - torch.exp(-base.nll)).sum())
    stats.count += int(targets.numel())
