"""Straightforward reference implementations of the merge math (SPEC.md).

Whole tensors, torch's stable sort for the drop order, math.fsum for float64
statistics. Written from the definitions, not from the engine, so the tests
compare two independent implementations. Float32 evaluation order follows
docs/semantics.md (task order, products before sums, scalars cast once).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
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


_M32 = np.uint64(0xFFFFFFFF)


def _fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's finalizer on uint64 arrays of 32-bit values (numpy's
    unsigned products wrap mod 2**64, a multiple of 2**32)."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x85EBCA6B)) & _M32
    x = x ^ (x >> np.uint64(13))
    x = (x * np.uint64(0xC2B2AE35)) & _M32
    return x ^ (x >> np.uint64(16))


def block_uniforms(key: int, n: int, start: int = 0) -> np.ndarray:
    """docs/semantics.md: the draws of a canonical block's elements start..start+n-1 for its
    key, every lane per element: c1 = fmix32(k_lo ^ fmix32(k_hi ^ i_hi)),
    c2 = fmix32(c1 ^ 0x9E3779B9), h = fmix32(fmix32(i_lo ^ c1) + c2),
    u = (h >> 8) / 2**24."""
    i = np.arange(start, start + n, dtype=np.uint64)
    k_lo, k_hi = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    c1 = _fmix32(k_lo ^ _fmix32(k_hi ^ (i >> np.uint64(32))))
    c2 = _fmix32(c1 ^ np.uint64(0x9E3779B9))
    h = _fmix32((_fmix32((i & _M32) ^ c1) + c2) & _M32)
    return (h >> np.uint64(8)).astype(np.float64) / float(1 << 24)


def stream(seed, task, name, row_start, row_end, block_rows, row_numel) -> torch.Tensor:
    """SPEC 4: key = hash(run seed, task index, tensor name, row block start);
    each element's draw a hash of the key and its index in the block."""
    parts = []
    for block in range(0, row_end, block_rows):
        if block + block_rows <= row_start:
            continue
        h = hashlib.blake2b(f"{seed}\0{task}\0{name}\0{block}".encode(), digest_size=8)
        key = int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)
        parts.append(torch.from_numpy(block_uniforms(key, block_rows * row_numel)).float())
    u = torch.cat(parts)
    start = (row_start - (row_start // block_rows) * block_rows) * row_numel
    return u[start : start + (row_end - row_start) * row_numel]


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


def vocab_rows(rows: list[dict[str, torch.Tensor]], tokens: list[str]) -> list[torch.Tensor]:
    """mergekit's alignment of vocabulary rows, one token at a time: per input
    (0: the base), its float32 row of each token of `tokens`, where `rows[i]`
    maps the tokens input i has to its row. A token the base lacks: the base's
    row is the mean of the models that have it (summed in model order, then
    divided by their count; zero where none has it); a model lacking a token
    takes the base's row (so its τ there is 0)."""
    out: list[list[torch.Tensor]] = [[] for _ in rows]
    for t in tokens:
        if t in rows[0]:
            b = rows[0][t].float()
        else:
            have = [r[t].float() for r in rows[1:] if t in r]
            acc = torch.zeros_like(next(iter(rows[0].values())).float())
            for h in have:
                acc = acc + h
            b = acc / f32(len(have)) if have else acc
        out[0].append(b)
        for i, r in enumerate(rows[1:], 1):
            out[i].append(r[t].float() if t in r else b)
    return [torch.stack(x) for x in out]


# ------------------------------------------------------------------------------------
# the tensor-sums methods (slerp, nuslerp, multislerp, karcher, model_stock): whole
# tensors in float64, following each method's published algorithm step by step on
# the vectors themselves (not on a Gram matrix as the engine does), cast once
# ------------------------------------------------------------------------------------


def _d(x: torch.Tensor) -> torch.Tensor:
    return x.double()


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, threshold=0.9995, eps=1e-8):
    a64, b64 = _d(a).reshape(-1), _d(b).reshape(-1)
    na, nb = float(a64.norm()), float(b64.norm())
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = max(-1.0, min(1.0, float(((a64 / na) * (b64 / nb)).sum())))
    if abs(dot) > threshold:
        out = (1 - t) * a64 + t * b64
    else:
        th = math.acos(dot)
        out = (math.sin((1 - t) * th) * a64 + math.sin(t * th) * b64) / math.sin(th)
    return out.reshape(a.shape).float()


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise=False, flatten=True):
    shape = v0.shape
    a, b = _d(v0), _d(v1)
    if flatten or a.dim() <= 1:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos**2) <= 1e-16
    th = torch.acos(torch.where(colinear, 0, cos))
    res = (torch.sin((1 - t) * th) * a + torch.sin(t * th) * b) / torch.sin(th)
    res = torch.where(colinear, (1 - t) * a + t * b, res)
    if row_wise and not flatten and v0.dim() > 1:
        res = res.transpose(0, -1)
    return res.reshape(shape)


def multislerp(vs: list[torch.Tensor], w: list[float], normalize=True, eps=1e-8):
    if len(vs) == 1:
        return _d(vs[0])
    x = torch.stack([_d(v).reshape(-1) for v in vs])
    wt = torch.tensor(w, dtype=torch.float64)
    if normalize:
        wt = wt / wt.sum()
    norms = x.norm(dim=-1, keepdim=True)
    u = x / (norms + eps)
    mean = (u * wt.view(-1, 1)).sum(0)
    if float(mean.norm()) < eps:
        return (x * wt.view(-1, 1)).sum(0).reshape(vs[0].shape)
    mean = mean / mean.norm()
    dots = (u * mean).sum(-1, keepdim=True)
    tangent = ((u - dots * mean) * wt.view(-1, 1)).sum(0)
    tn = tangent.norm() + eps
    res = mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)
    return (res * (norms.squeeze(-1) * wt).sum()).reshape(vs[0].shape)


def karcher(vs: list[torch.Tensor], max_iter=10, tol=1e-5):
    if len(vs) == 1:
        return _d(vs[0])
    xs = [_d(v).reshape(-1) for v in vs]
    alphas = [1.0 / len(xs)] * len(xs)
    norms = [float(x.norm()) for x in xs]
    units = [x / n if n else torch.zeros_like(x) for x, n in zip(xs, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(_d(vs[0]))
    a = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    us = [units[i] for i in valid]
    mean = sum(ai * u for ai, u in zip(a, us, strict=True))
    mn = float(mean.norm())
    mean = us[0].clone() if mn < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, u in zip(a, us, strict=True):
            dot = max(-1.0, min(1.0, float(mean @ u)))
            th = math.acos(dot)
            if th < tol:
                continue
            tangent += ai * (th / math.sin(th)) * (u - dot * mean)
        tn = float(tangent.norm())
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
        un = float(mean.norm())
        if un > tol:
            mean = mean / un
    scale = sum(al * n for al, n in zip(alphas, norms, strict=True))
    return (scale * mean).reshape(vs[0].shape)


def model_stock(base: torch.Tensor, models: list[torch.Tensor], filter_wise=False):
    w0 = _d(base)
    ws = [_d(m) for m in models]
    shape = w0.shape
    if filter_wise and w0.dim() >= 1:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [(m.float() - base.float()).double().reshape(w0.shape) for m in models]
    cos = []
    for i, oa in enumerate(offsets):
        for ob in offsets[i + 1 :]:
            norm = oa.norm(dim=-1) * ob.norm(dim=-1)
            cos.append(((oa * ob).sum(-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    k = len(ws)
    den = 1 + (k - 1) * c
    t = torch.where(den.abs() < 1e-6, torch.zeros_like(c), k * c / den)
    return (t * (sum(ws) / k) + (1 - t) * w0).reshape(shape)


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


def at_tensor(setting, name: str, layers: int) -> float:
    """mergekit's per-tensor value (config.py evaluate_setting, plan.py's t): the
    first {filter, value} entry whose filter is in the name (or is None / '*');
    a gradient [v0, ..., vm] at layer i of `layers` is read at t = i / (layers - 1)
    (1 for one layer; 0 for a tensor of no layer) by linear interpolation between
    its two nearest points."""
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for e in setting:
            if e.get("filter") in (None, "*") or e["filter"] in name:
                return at_tensor(e["value"], name, layers)
        raise KeyError(name)
    if not isinstance(setting, list):
        return float(setting)
    import re

    m = re.search(r"\.(?:layers|h|blocks|layer)\.(\d+)\.", "." + name)
    t = 0.0 if m is None else (int(m.group(1)) / (layers - 1) if layers > 1 else 1.0)
    x = t * (len(setting) - 1)
    i = int(math.floor(x))
    j = min(i + 1, len(setting) - 1)
    return (1 - (x - i)) * setting[i] + (x - i) * setting[j]
