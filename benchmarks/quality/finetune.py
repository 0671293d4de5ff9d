"""LP-FT fine-tuning of all-MiniLM-L6-v2 on each task, cached as HF-layout checkpoints.

LP-FT (Kumar et al. 2022): first fit a linear head on frozen mean-pooled base features (the
"linear probe"), then fine-tune the encoder with that head frozen. Why LP-FT and not plain
fine-tuning: merging replaces each task's encoder by a merged encoder but keeps the task's head,
so the head must stay meaningful for encoders near the base. A head fitted on base features and
frozen during fine-tuning is exactly that, which is also the setting of the paper's ViT
experiments (frozen zero-shot CLIP heads, only the encoder is fine-tuned and merged).

Settings (the issue's): AdamW lr 5e-5, batch 16, max length 64, 300 steps (one epoch of the
4800-example training split), linear warm-up over 10% then linear decay, no weight decay (HF
Trainer's default: decay would move every embedding row of unseen tokens and blur the task
vectors with a uniform shrink), gradient clipping at 1.0, dropout on. The probe is a multinomial
logistic regression fitted by full-batch L-BFGS with its L2 strength chosen on the validation
split from {1e-4, 1e-3, 1e-2}; it does not depend on the fine-tuning seed.

Usage: python -m benchmarks.quality.finetune [--tasks a,b] [--seeds 0,1,2] [--steps 300]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.quality import data as qdata
from benchmarks.quality import modeling as qm

torch = qm.torch
ROOT = Path(__file__).resolve().parent
LP_L2_GRID = (1e-4, 1e-3, 1e-2)


@dataclass(frozen=True)
class FTSettings:
    """Everything that defines a cached fine-tune (compared before a cache is reused)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 5e-5
    warmup_frac: float = 0.1
    weight_decay: float = 0.0
    max_len: int = qm.MAX_LEN
    clip: float = 1.0


@dataclass(frozen=True)
class Layout:
    """Where the benchmark keeps its files under one root (the full run's or the smoke's)."""

    root: Path = ROOT

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def data(self) -> Path:
        return self.cache / "data"

    @property
    def base(self) -> Path:
        return self.cache / "models" / "base"

    def head_dir(self, sizes: qdata.SplitSizes, task: str) -> Path:
        return self.cache / "heads" / _size_tag(sizes) / task

    def model_dir(self, sizes: qdata.SplitSizes, seed: int, task: str) -> Path:
        return self.cache / "models" / _size_tag(sizes) / f"seed{seed}" / task


def _size_tag(sizes: qdata.SplitSizes) -> str:
    return f"{sizes.train}-{sizes.val}-{sizes.test}"


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big")


class TaskTokens:
    """A task's splits tokenized once (ids without padding) plus labels."""

    def __init__(self, task: qdata.TaskData, tokenizer, max_len: int = qm.MAX_LEN):
        self.task = task
        self.ids = {s: qm.tokenize(tokenizer, task.split(s).text, max_len) for s in _SPLITS}
        self.y = {s: list(task.split(s).label) for s in _SPLITS}


_SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------------------------
# Linear probe


def fit_logreg(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float) -> qm.Head:
    """Multinomial logistic regression by full-batch L-BFGS (deterministic: zero init)."""
    w = torch.zeros((n_classes, x.shape[1]), requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=500,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-7,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return qm.Head(w.detach().clone(), b.detach().clone(), [])


def linear_probe(
    layout: Layout, sizes: qdata.SplitSizes, tok: TaskTokens, base_model
) -> tuple[qm.Head, dict]:
    """The task's head on frozen base features (cached; shared by every fine-tuning seed)."""
    out = layout.head_dir(sizes, tok.task.task)
    if (out / "head.safetensors").is_file():
        return qm.Head.load(out / "head.safetensors"), json.loads((out / "lp.json").read_text())
    t0 = time.time()
    feats = {s: qm.features(base_model, tok.ids[s]) for s in _SPLITS}
    y = {s: torch.tensor(tok.y[s]) for s in _SPLITS}
    n_cls = len(tok.task.labels)
    best: tuple[float, float, qm.Head] | None = None
    val_by_l2 = {}
    for l2 in LP_L2_GRID:
        head = fit_logreg(feats["train"], y["train"], n_cls, l2)
        acc = 100.0 * (head.logits(feats["val"]).argmax(-1) == y["val"]).float().mean().item()
        val_by_l2[str(l2)] = acc
        if best is None or acc > best[0]:
            best = (acc, l2, head)
    assert best is not None
    val_acc, l2, head = best
    head.labels = list(tok.task.labels)
    test_acc = 100.0 * (head.logits(feats["test"]).argmax(-1) == y["test"]).float().mean().item()
    info = {
        "l2": l2,
        "val_by_l2": val_by_l2,
        "val_acc": val_acc,
        "test_acc": test_acc,
        "seconds": round(time.time() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    head.save(out / "head.safetensors")
    (out / "lp.json").write_text(json.dumps(info, indent=2))
    return head, info


# ---------------------------------------------------------------------------------------------
# Fine-tuning with the head frozen


def finetune(
    base_dir: Path, tok: TaskTokens, head: qm.Head, seed: int, cfg: FTSettings, log=print
) -> tuple[object, list[dict]]:
    """Fine-tune the encoder (head frozen) and return it with a loss log."""
    torch.manual_seed(_stable_seed("ft", seed, tok.task.task))
    model = qm.bert_from_dir(base_dir)
    # The pooler is not on the path to the head; freezing it keeps its task vector exactly 0.
    for p in model.pooler.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup_frac * cfg.steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(_stable_seed("order", seed, tok.task.task))
    ids, ys = tok.ids["train"], tok.y["train"]
    order: list[int] = []
    hw, hb = head.weight.detach(), head.bias.detach()
    model.train()
    logs: list[dict] = []
    running, t0 = 0.0, time.time()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order += torch.randperm(len(ids), generator=gen).tolist()
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        inp, mask = qm.collate([ids[i] for i in idx])
        logits = qm.encode(model, inp, mask) @ hw.T + hb
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([ys[i] for i in idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        sched.step()
        running += loss.item()
        every = max(1, min(25, cfg.steps // 4))
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            n = (step % every) + 1
            logs.append({"step": step + 1, "loss": running / n, "s": round(time.time() - t0, 1)})
            log(
                f"  [{tok.task.task} seed{seed}] step {step + 1}/{cfg.steps} "
                f"loss {running / n:.4f} ({time.time() - t0:.0f}s)"
            )
            running = 0.0
    return model.eval(), logs


def run_task(
    layout: Layout,
    sizes: qdata.SplitSizes,
    task: str,
    seeds: list[int],
    cfg: FTSettings,
    log=print,
) -> list[dict]:
    """Linear probe + LP-FT for one task and several seeds; cached runs are skipped."""
    base = qm.prepare_base(qdata.base_model_dir(), layout.base)
    todo = [s for s in seeds if not _cached(layout.model_dir(sizes, s, task), cfg)]
    results = [
        json.loads((layout.model_dir(sizes, s, task) / "finetune.json").read_text())
        for s in seeds
        if s not in todo
    ]
    if not todo:
        return results
    td = qdata.load_task(task, layout.data, sizes)
    tok = TaskTokens(td, qm.load_tokenizer(base), cfg.max_len)
    head, lp = linear_probe(layout, sizes, tok, qm.bert_from_dir(base))
    log(f"[{task}] linear probe: val {lp['val_acc']:.2f} test {lp['test_acc']:.2f} (l2={lp['l2']})")
    for seed in todo:
        t0 = time.time()
        model, logs = finetune(base, tok, head, seed, cfg, log)
        t_ft = time.time() - t0
        val_acc = qm.accuracy(model, head, tok.ids["val"], tok.y["val"])
        test_acc = qm.accuracy(model, head, tok.ids["test"], tok.y["test"])
        info = {
            "task": task,
            "seed": seed,
            "settings": asdict(cfg),
            "sizes": asdict(sizes),
            "n": {s: len(tok.ids[s]) for s in _SPLITS},
            "linear_probe": lp,
            "val_acc": val_acc,
            "test_acc": test_acc,
            "finetune_seconds": round(t_ft, 1),
            "log": logs,
        }
        qm.save_hf_dir(
            model,
            layout.model_dir(sizes, seed, task),
            base,
            extra={"head.safetensors": head, "finetune.json": info},
        )
        log(
            f"[{task} seed{seed}] fine-tuned: val {val_acc:.2f} test {test_acc:.2f} "
            f"(LP test {lp['test_acc']:.2f}; {t_ft:.0f}s)"
        )
        results.append(info)
    return results


def _cached(model_dir: Path, cfg: FTSettings) -> bool:
    info = model_dir / "finetune.json"
    if not (info.is_file() and (model_dir / "model.safetensors").is_file()):
        return False
    return json.loads(info.read_text()).get("settings") == asdict(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description="LP-FT fine-tuning of the benchmark's task models")
    ap.add_argument("--tasks", default=",".join(qdata.TASKS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=FTSettings.steps)
    ap.add_argument("--root", default=str(ROOT), help="benchmark root (cache/ lives under it)")
    ap.add_argument("--train", type=int, default=qdata.SplitSizes.train)
    ap.add_argument("--val", type=int, default=qdata.SplitSizes.val)
    ap.add_argument("--test", type=int, default=qdata.SplitSizes.test)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (busy machine: 1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = qdata.SplitSizes(train=args.train, val=args.val, test=args.test)
    cfg = FTSettings(steps=args.steps)
    layout = Layout(Path(args.root))
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    for task in args.tasks.split(","):
        run_task(layout, sizes, task, seeds, cfg, log=lambda m: print(m, flush=True))
    print(f"done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
