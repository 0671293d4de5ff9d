"""Straightforward reference implementations of the merge math (SPEC.md).

Whole tensors, torch's stable sort for the drop order, math.fsum for float64
statistics. Written from the definitions, not from the engine, so the tests
compare two independent implementations. Float32 evaluation order follows
docs/semantics.md (task order, products before sums, scalars cast once).
"""

from __future__ import annotations

import hashlib
import math

import torch

F32 = torch.float32


def f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=F32)


def quantile(sorted_vals: list[float], p: float) -> float:
    n = len(sorted_vals)
    h = p * (n - 1)
    j = math.floor(h)
    if j + 1 > n - 1:
        return sorted_vals[j]
    return sorted_vals[j] + (h - j) * (sorted_vals[j + 1] - sorted_vals[j])


def fsum_sq(x: torch.Tensor) -> float:
    return math.fsum(v * v for v in x.double().reshape(-1).tolist())


def fsum_abs(x: torch.Tensor) -> float:
    return math.fsum(abs(v) for v in x.double().reshape(-1).tolist())


def keep_mask(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Keep ranks [lo, hi) of the stable ascending order of |x| (flat)."""
    order = torch.sort(x.reshape(-1).abs(), stable=True).indices
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order[lo:hi]] = True
    return mask.view(x.shape)


def scale_for(sp: dict, tau: torch.Tensor, mask: torch.Tensor, drop_rate: float) -> float:
    eps = sp.get("eps", 1e-12)
    kept = torch.where(mask, tau, torch.zeros(()))
    mode = sp["rescale"]
    if mode == "l2":
        return math.sqrt(fsum_sq(tau)) / (math.sqrt(fsum_sq(kept)) + eps)
    if mode == "l1":
        return fsum_abs(tau) / (fsum_abs(kept) + eps)
    if mode == "inverse_keep":
        return 1.0 / (1.0 - drop_rate) if drop_rate < 1.0 else 0.0
    return 1.0


def tadrop_rate(x_abs: torch.Tensor, sp: dict) -> float:
    vals = sorted(x_abs.double().reshape(-1).tolist())
    qa, qb = quantile(vals, sp["low_q"]), quantile(vals, sp["high_q"])
    return min(qa / (qb + sp.get("eps", 1e-12)), sp.get("max_drop", 1.0))


def ranks_for(sp: dict, n: int, rate: float | None) -> tuple[int, int, float]:
    m = sp["method"]
    if m == "tadrop":
        return math.floor(rate * n), n, rate
    if m == "magnitude":
        lo = n - math.floor(sp["density"] * n)
        return lo, n, (lo / n if n else 0.0)
    if m == "breadcrumbs":
        lo = max(0, math.floor((1.0 - sp["density"] - sp["gamma"]) * n))
        hi = n - math.floor(sp["gamma"] * n)
        return lo, hi, ((n - (hi - lo)) / n if n else 0.0)
    if m == "magnitude_outliers":
        keep = math.floor(sp["density"] * n)
        lo = max(0, n - keep - math.floor(sp["gamma"] * n))
        return lo, lo + keep, ((n - keep) / n if n else 0.0)
    raise ValueError(m)


def stream(seed, task, name, row_start, row_end, block_rows, row_numel) -> torch.Tensor:
    """SPEC 4: seed = hash(run seed, task index, tensor name, row block start)."""
    parts = []
    for block in range(0, row_end, block_rows):
        if block + block_rows <= row_start:
            continue
        h = hashlib.blake2b(f"{seed}\0{task}\0{name}\0{block}".encode(), digest_size=8)
        g = torch.Generator().manual_seed(int.from_bytes(h.digest(), "little") & ((1 << 63) - 1))
        parts.append(torch.rand(block_rows * row_numel, generator=g))
    u = torch.cat(parts)
    return u[: (row_end - row_start) * row_numel]


def sparsify(
    tau: torch.Tensor, sp: dict, *, task: int, name: str, seed: int, block_rows: int,
    rate: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """Φ(τ) for one whole tensor (float32)."""
    m = sp["method"]
    n = tau.numel()
    if m == "none" or n == 0:
        return tau
    if m in ("tadrop", "magnitude", "breadcrumbs", "magnitude_outliers"):
        if m == "tadrop" and rate is None:
            rate = tadrop_rate(tau.abs(), sp)
        lo, hi, d = ranks_for(sp, n, rate)
        mask = keep_mask(tau, lo, hi)
        s = scale_for(sp, tau, mask, d)
        return torch.where(mask, tau * f32(s), torch.zeros(()))
    rows = tau.shape[0] if tau.dim() else 1
    row_numel = n // rows if rows else 1
    u = stream(seed, task, name, 0, rows, block_rows, row_numel).view(tau.shape)
    if m == "random":
        s = 1.0 / (1.0 - sp["p"]) if sp["rescale"] == "inverse_keep" else 1.0
        return torch.where(u >= sp["p"], tau * f32(s), torch.zeros(()))
    if m == "della":
        row = tau.reshape(-1, tau.shape[-1] if tau.dim() >= 2 else n)
        if tau.dim() >= 2:
            row = tau.reshape(tau.shape[0], -1)
        mlen = row.shape[1]
        out = torch.zeros_like(row)
        uu = u.reshape(row.shape)
        dens, eps = sp["density"], sp["epsilon"]
        for i in range(row.shape[0]):
            order = torch.sort(row[i].abs(), stable=True).indices.tolist()
            for rank, j in enumerate(order):
                p = (dens - eps) + 2.0 * eps * rank / (mlen - 1) if mlen > 1 else dens
                if float(uu[i, j]) < p:
                    s = 1.0 / p if sp["rescale"] == "inverse_keep" else 1.0
                    out[i, j] = row[i, j] * f32(s)
        return out.view(tau.shape)
    raise ValueError(m)


def global_sparsify(taus: dict[str, torch.Tensor], sp: dict) -> dict[str, torch.Tensor]:
    """scope: global over one task's mergeable tensors (sorted by name, row-major)."""
    names = sorted(taus)
    if sp["method"] == "tadrop":
        flat = torch.cat([taus[n].reshape(-1) for n in names])
        rate = tadrop_rate(flat.abs(), sp)
        return {
            n: sparsify(taus[n], sp, task=0, name=n, seed=0, block_rows=1, rate=rate) for n in names
        }
    flat = torch.cat([taus[n].reshape(-1) for n in names])
    lo, hi, d = ranks_for(sp, flat.numel(), None)
    mask = keep_mask(flat, lo, hi)
    s = scale_for(sp, flat, mask, d)
    out, off = {}, 0
    for n in names:
        k = taus[n].numel()
        mk = mask[off : off + k].view(taus[n].shape)
        out[n] = torch.where(mk, taus[n] * f32(s), torch.zeros(()))
        off += k
    return out


def wsum(ts: list[torch.Tensor], ws: list[float]) -> torch.Tensor:
    acc = ts[0] * f32(ws[0])
    for t, w in zip(ts[1:], ws[1:], strict=True):
        acc = acc + t * f32(w)
    return acc


def linear(base, thetas, ts, ws, normalize=True, sparse=True):
    """mergekit's linear: Σ w θ (/ Σ w); on task vectors with a sparsifier."""
    if not sparse:
        acc = wsum(thetas, ws)
        return acc / f32(sum(ws)) if normalize else acc
    acc = wsum(ts, ws)
    return base + (acc / f32(sum(ws)) if normalize else acc)


def combine(method: str, base, thetas, ts, ws, scale, disjoint="mean", sparse=True):
    if method in ("average", "linear"):
        return linear(base, thetas, ts, ws, True, sparse)
    if method == "task_arithmetic":
        return base + f32(scale) * wsum(ts, ws)
    if method == "ties":
        prods = [t * f32(w) for t, w in zip(ts, ws, strict=True)]
        total = prods[0]
        for p in prods[1:]:
            total = total + p
        sigma = torch.sign(total)
        maj = int(sigma.sum())
        sigma = torch.where(sigma == 0, f32(-1.0 if maj < 0 else 1.0), sigma)
        num = torch.zeros_like(base)
        den = torch.zeros_like(base)
        for p, w in zip(prods, ws, strict=True):
            agree = torch.sign(p) == sigma
            num = num + torch.where(agree, p, torch.zeros(()))
            den = den + torch.where(agree, f32(w), torch.zeros(()))
        if disjoint == "mean":
            delta = torch.where(den != 0, num / torch.where(den != 0, den, f32(1.0)), f32(0.0))
        else:
            delta = num
        return base + f32(scale) * delta
    raise ValueError(method)


def emr(ts: list[torch.Tensor]):
    """(τ_uni, masks, per-task Σ|t_k|, per-task Σ|M_k τ_uni|) for one tensor."""
    total = ts[0]
    for t in ts[1:]:
        total = total + t
    sigma = torch.where(total > 0, f32(1.0), f32(-1.0))
    masks = [(t * sigma) > 0 for t in ts]
    mag = torch.zeros_like(ts[0])
    for t, m in zip(ts, masks, strict=True):
        mag = torch.maximum(mag, torch.where(m, t.abs(), torch.zeros(())))
    uni = torch.where(mag == 0, torch.zeros(()), sigma * mag)
    return (
        uni,
        masks,
        [fsum_abs(t) for t in ts],
        [fsum_abs(torch.where(m, uni, 0.0)) for m in masks],
    )


# --- mergekit's element-wise and whole-tensor methods (docs/semantics.md) -----------


def nearswap(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    """w·θ1 + (1-w)·θ0, w = clamp(t / max(|θ0-θ1|, 1e-6), 0, 1)."""
    w = torch.clamp(f32(t) / torch.clamp(torch.abs(base - model), min=1e-6), 0.0, 1.0)
    return w * model + (1 - w) * base


def _moved(ts: list[torch.Tensor], eps: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    moved = [t.abs() > f32(eps) for t in ts]
    count = torch.zeros(ts[0].shape, dtype=torch.int64)
    for m in moved:
        count = count + m.long()
    return moved, count


def ram(base: torch.Tensor, ts: list[torch.Tensor], eps: float, lambdas=None) -> torch.Tensor:
    """θ0 + Σ_k [|t_k|>ε] (c == 1 ? λ_k t_k : t_k / c), c the tasks moving the entry."""
    moved, count = _moved(ts, eps)
    delta = torch.zeros_like(base)
    for k, (t, m) in enumerate(zip(ts, moved, strict=True)):
        lam = 1.0 if lambdas is None else lambdas[k]
        unique = torch.where(m & (count == 1), t * f32(lam), torch.zeros(()))
        shared = torch.where(m & (count > 1), t / count.clamp(min=1).float(), torch.zeros(()))
        delta = delta + (unique + shared)
    return base + delta


def ramplus_lambdas(ts: list[torch.Tensor], eps: float, r: float, alpha: float) -> list[float]:
    moved, count = _moved(ts, eps)
    out = []
    for m in moved:
        shared = int((m & (count > 1)).sum())
        unique = int((m & (count == 1)).sum())
        out.append(1.0 + r * min(max(shared / max(unique, eps), 0.0), alpha))
    return out


def sce_variance(ts: list[torch.Tensor]) -> torch.Tensor:
    """Population variance across tasks, float32: mean = Σ t / K, Σ (t - mean)² / K."""
    k = f32(float(len(ts)))
    total = ts[0]
    for t in ts[1:]:
        total = total + t
    mean = total / k
    acc = (ts[0] - mean) ** 2
    for t in ts[1:]:
        acc = acc + (t - mean) ** 2
    return acc / k


def sce_mask(ts: list[torch.Tensor], topk: float) -> torch.Tensor:
    """The top floor(topk · nonzero) variances (ties: the larger flat index kept)."""
    var = sce_variance(ts).reshape(-1)
    if topk >= 1:
        return torch.ones(ts[0].shape, dtype=torch.bool)
    kept = math.floor(topk * int(torch.count_nonzero(var)))
    order = torch.sort(var, stable=True).indices
    mask = torch.zeros(var.numel(), dtype=torch.bool)
    mask[order[var.numel() - kept :]] = True
    return mask.view(ts[0].shape)


def sce(base: torch.Tensor, ts: list[torch.Tensor], topk: float) -> torch.Tensor:
    """SCE: variance selection, weights mean t² / Σ, sign-elected weighted mean."""
    mask = sce_mask(ts, topk)
    us = [torch.where(mask, t, torch.zeros(())) for t in ts]
    means = [fsum_sq(u) / u.numel() for u in us]
    total = math.fsum(means)
    w = [1.0 / len(us)] * len(us) if abs(total) < 1e-6 else [m / total for m in means]
    s = us[0]
    for u in us[1:]:
        s = s + u
    sign = torch.where(s >= 0, f32(1.0), f32(-1.0))
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for u, wk in zip(us, w, strict=True):
        agree = torch.sign(u) == sign
        num = num + torch.where(agree, u * f32(wk), torch.zeros(()))
        den = den + torch.where(agree, f32(wk), torch.zeros(()))
    return base + num / torch.clamp(den, min=1e-6)


def arcee_importance(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """|θ_1 − θ0| times KL(softmax(θ_1) + 1e-8 ‖ softmax(θ0) + 1e-8) over the last
    dimension, the whole tensor at once (float32)."""
    t = model - base
    if base.dim() == 0:
        return t.abs() * 0.0  # softmax of one value: p = q, KL = 0
    eps = f32(1e-8)
    p = torch.softmax(base + t, dim=-1) + eps
    q = torch.softmax(base, dim=-1) + eps
    return t.abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def arcee_mask(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """I >= median + 1.5·(Q3 − Q1), Q at sorted positions floor(q·(n − 1))."""
    imp = arcee_importance(base, model)
    s = torch.sort(imp.reshape(-1)).values
    n = s.numel()
    q1, med, q3 = s[(n - 1) // 4], s[(n - 1) // 2], s[3 * (n - 1) // 4]
    return imp >= med + f32(1.5) * (q3 - q1)


def arcee_fusion(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """θ0 + (θ_1 − θ0)·mask."""
    return base + (model - base) * arcee_mask(base, model).to(F32)
