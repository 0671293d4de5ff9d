"""Randomized crash soak: SIGKILL merges at many points, recover, compare bytes.

    python benchmarks/crash_soak.py --kills 100 --seed 0

A tiny zoo (tests/checkpoints.py) merged with TIES + TADrop and small units, so
that tensors split and the statistics stage runs. One uninterrupted merge gives
the reference output (and the phases' timing); a merge of another config gives
an "old" output for the `--overwrite` trials. Then, trial after trial, a merge
(`python -m tadmerge.cli merge CONFIG`, a third of them with `--overwrite` over
the old output) is SIGKILLed:

- at a named step, through tests/killpoints.py (after the plan, mid-statistics,
  after k units, inside publish before/after the manifest and the rename), or
- after a random delay, from the process start or from the moment the
  statistics are saved, spread over the reference run's duration.

After each kill (the phase it landed in is read from what it left on disk):

- a published output (or, with --overwrite, whatever holds the output name) must
  pass `verify` and be the reference's bytes (or the old output's);
- with --overwrite, the output name must still hold the old or the new output;
- if a staging directory is left, a plain rerun must be refused with exit 2
  naming --resume (or succeed), then `--resume` must finish (the resume is
  itself killed again now and then);
- without staging, a rerun must succeed;
- in the end the output must pass verify and equal the reference (every file but
  merge_report.json, which holds timings, compared by the manifest's sha256),
  and no staging directory or old output may be left behind.

Writes benchmarks/results/crash_soak.json: kills (by phase, by kill point),
resumes, reruns, outputs compared, mismatches, and every problem found. The
same loop, a dozen kills, is tests/test_crash_soak.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import killpoints  # noqa: E402  (tests/killpoints.py)
import yaml  # noqa: E402
from checkpoints import write_zoo  # noqa: E402  (tests/checkpoints.py)

RUNTIME = {
    "block_elements": 64,
    "max_unit_elements": 256,  # tensors split into row blocks
    "memory_budget": "256MB",
    "progress": "none",
    "device": "cpu",
}
NOT_COMPARED = {"merge_report.json"}  # holds timings
STAGING = ".out.tadmerge-staging"
ASIDE = ".out.tadmerge-old-"


def write_config(path: Path, base: str, models: list[str], out: Path, scale: float) -> str:
    cfg = {
        "base": base,
        "models": [{"path": p, "name": f"t{i}"} for i, p in enumerate(models)],
        "sparsify": {"method": "tadrop"},
        "merge": {"method": "ties", "scale": scale},
        "exclude": ["^head\\."],
        "output": {"path": str(out)},
        "runtime": dict(RUNTIME),
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def output_hashes(d: Path) -> dict[str, str] | None:
    """{file: sha256} from the manifest, if `d` passes verify; None otherwise."""
    from tadmerge.io.publish import verify_output

    if verify_output(str(d)):
        return None
    doc = json.loads((d / "manifest.json").read_text())
    return {e["path"]: e["sha256"] for e in doc["files"] if e["path"] not in NOT_COMPARED}


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [e.get("PYTHONPATH")])])
    return e


def subprocess_cli(argv: list[str]) -> tuple[int, str]:
    p = subprocess.run(
        [sys.executable, "-m", "tadmerge.cli", *argv],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return p.returncode, p.stderr


def in_process_cli(argv: list[str]) -> tuple[int, str]:
    """tadmerge's main() in this process, its stderr captured."""
    import contextlib
    import io
    import logging

    from tadmerge.cli import main

    err = io.StringIO()
    handler = logging.StreamHandler(err)
    log = logging.getLogger("tadmerge")
    log.addHandler(handler)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(["-q", *argv])
    finally:
        log.removeHandler(handler)
    return rc, err.getvalue()


class Soak:
    """The soak's state: the zoo, the reference outputs, the counts and problems."""

    def __init__(self, work: Path, cli: Callable[[list[str]], tuple[int, str]] = subprocess_cli):
        self.work = work
        self.cli = cli  # runs the uninterrupted merges (recoveries)
        self.out = work / "out"
        self.staging = work / STAGING
        self.counts: Counter = Counter()
        self.by_phase: Counter = Counter()
        self.by_point: Counter = Counter()
        self.problems: list[dict] = []
        self.leftovers: list[dict] = []
        self.trials: list[dict] = []

    # ------------------------------------------------------------ setup

    def prepare(self) -> None:
        work = self.work
        work.mkdir(parents=True, exist_ok=True)
        base, models, *_ = write_zoo(str(work / "in"))
        self.cfg = write_config(work / "merge.yaml", base, models, self.out, 0.8)
        self.old_cfg = old_cfg = write_config(work / "old.yaml", base, models, self.out, 0.5)
        self.clean()
        # the reference, timed from outside: process start, staging, stats saved, exit
        t = self._timed_run(["merge", self.cfg])
        self.timing = t
        self.ref = output_hashes(self.out)
        assert self.ref is not None, "the reference merge does not verify"
        report = json.loads((self.out / "merge_report.json").read_text())
        self.total_units = report["units"]["total"]
        self.out.rename(work / "ref")
        rc, err = self.cli(["merge", old_cfg])
        assert rc == 0, err
        self.old = output_hashes(self.out)
        assert self.old is not None and self.old != self.ref
        self.out.rename(work / "old")

    def _timed_run(self, argv: list[str]) -> dict:
        t0 = time.monotonic()
        p = subprocess.Popen(
            [sys.executable, "-m", "tadmerge.cli", *argv],
            cwd=REPO,
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        marks: dict[str, float] = {}
        stats = self.staging / ".tadmerge" / "stats.json"
        while p.poll() is None:
            now = time.monotonic() - t0
            if "staging_s" not in marks and self.staging.exists():
                marks["staging_s"] = now
            if "stats_saved_s" not in marks and stats.exists():
                marks["stats_saved_s"] = now
            time.sleep(0.002)
        marks["total_s"] = time.monotonic() - t0
        err = p.stderr.read().decode()
        assert p.returncode == 0, err
        return marks

    def clean(self) -> None:
        for p in self.work.iterdir():
            if p.name in ("out", STAGING) or p.name.startswith(ASIDE):
                shutil.rmtree(p)

    # ------------------------------------------------------------ one killed run

    def killed_run(self, argv: list[str], kill: tuple) -> int:
        """Run `tadmerge ARGV` in a subprocess that is SIGKILLed as `kill` says:
        ("point", NAME[:N]) through tests/killpoints.py, or ("delay", anchor, s):
        `s` seconds after the process starts ("start") or after the statistics
        are saved ("stats"). Returns the exit status (-9 when killed)."""
        if kill[0] == "point":
            cmd = [sys.executable, killpoints.__file__, f"--at={kill[1]}", "--", *argv]
        else:
            cmd = [sys.executable, "-m", "tadmerge.cli", *argv]
        p = subprocess.Popen(
            cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        if kill[0] == "delay":
            _, anchor, delay = kill
            stats = self.staging / ".tadmerge" / "stats.json"
            if anchor == "stats":
                while p.poll() is None and not stats.exists():
                    time.sleep(0.001)
            try:
                p.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
        if p.returncode == killpoints.UNREACHABLE:
            raise RuntimeError(err.decode())
        if p.returncode not in (0, -signal.SIGKILL):
            self.problem("killed run", kill, f"exit {p.returncode}: {err.decode()[-500:]}")
        return p.returncode

    def phase(self, overwrite: bool) -> str:
        """Where the kill landed, read from what it left."""
        asides = [p for p in self.work.iterdir() if p.name.startswith(ASIDE)]
        if not self.staging.exists():
            if self.out.exists() and (not overwrite or output_hashes(self.out) == self.ref):
                return "published"
            return "publish" if asides else "plan"
        state = self.staging / ".tadmerge"
        if (self.staging / "manifest.json").exists() or asides:
            return "publish"
        if not (state / "fingerprint").exists():
            return "plan"
        if not (state / "stats.json").exists():
            return "statistics"
        if (self.staging / "merge_report.json").exists():
            return "publish"
        units = state / "units.jsonl"
        n = len(units.read_text().splitlines()) if units.exists() else 0
        return "finalize" if n >= self.total_units else "apply"

    # ------------------------------------------------------------ checks

    def problem(self, step: str, kill, what: str) -> None:
        kills = self.trials[-1]["kills"] if self.trials else []
        phase = kills[-1]["phase"] if kills else None  # where the last kill landed
        self.problems.append(
            {"trial": len(self.trials), "step": step, "kill": kill, "phase": phase, "what": what}
        )

    def check_after_kill(self, kill, overwrite: bool) -> None:
        """Whatever holds the output name is a verified complete output."""
        if not self.out.exists():
            if overwrite:
                self.problem("after kill", kill, "--overwrite: the old output is gone and the "
                             "new one not in place (output name empty)")  # fmt: skip
            return
        h = output_hashes(self.out)
        allowed = [self.ref, self.old] if overwrite else [self.ref]
        if h is None:
            self.problem("after kill", kill, "the output does not pass verify")
        elif h not in allowed:
            self.problem("after kill", kill, "the output differs from the reference")

    def check_changed_config_refused(self, flags: list[str], kill) -> None:
        """A staging directory with merge work in it resumes only under its own plan."""
        state = self.staging / ".tadmerge"
        if not ((state / "fingerprint").exists() or (self.staging / "manifest.json").exists()):
            return  # killed before the plan's fingerprint was written: nothing to protect
        if (self.out / ".tadmerge").exists() and not state.exists():
            return  # the staging name holds the old output an --overwrite swapped out
        rc, err = self.cli(["merge", self.old_cfg, "--resume", *flags])
        if rc == 2 and "changed" in err:
            self.counts["changed_config_resumes_refused"] += 1
            return
        what = f"exit {rc}, not 2 'changed': {err.strip()[-300:]}"
        if rc == 0 and self.out.exists():
            h = output_hashes(self.out)
            weights = {k: v for k, v in (h or {}).items() if k != "merge_config.yaml"}
            if h == self.old:
                what = "accepted: published the other config's merge"
            elif weights == {k: v for k, v in self.ref.items() if k != "merge_config.yaml"}:
                what = (
                    "accepted: published the interrupted config's bytes as the other "
                    "config's merge (the units logged under the first config reused)"
                )
            else:
                what = "accepted: published bytes that are neither config's merge"
            shutil.rmtree(self.out)  # recover from scratch
        self.problem("--resume, changed config", kill, what)

    def recover(self, overwrite: bool, kill, chain: list[tuple]) -> None:
        """Rerun / --resume until the merge is published (`chain`: kills for the
        next attempts, each a killed subprocess)."""
        flags = ["--overwrite"] if overwrite else []
        for _ in range(8):
            published = not self.staging.exists() and self.out.exists()
            if published and output_hashes(self.out) == self.ref:
                return
            if self.staging.exists():
                self.check_changed_config_refused(flags, kill)
                rc, err = self.cli(["merge", self.cfg, *flags])
                if rc == 2 and "--resume" in err:
                    self.counts["reruns_refused"] += 1
                elif rc == 0:
                    self.counts["reruns"] += 1
                    continue
                else:
                    self.problem("plain rerun", kill, f"exit {rc}, not 2 naming --resume: "
                                 f"{err.strip()[-300:]}")  # fmt: skip
                argv = ["merge", self.cfg, "--resume", *flags]
                counter = "resumes"
            else:
                argv = ["merge", self.cfg, *flags]
                counter = "reruns"
            if chain:
                again = chain.pop(0)
                rc = self.killed_run(argv, again)
                if rc == -signal.SIGKILL:
                    self.count_kill(again, overwrite, f"{counter[:-1]} run")
                    self.check_after_kill(again, overwrite)
                else:
                    self.counts[counter] += 1
                continue
            rc, err = self.cli(argv)
            self.counts[counter] += 1
            if rc != 0:
                self.problem(counter[:-1], kill, f"exit {rc}: {err.strip()[-300:]}")
                return
        self.problem("recover", kill, "not published after 8 attempts")

    def check_final(self, kill) -> None:
        self.counts["outputs_compared"] += 1
        h = output_hashes(self.out) if self.out.exists() else None
        if h != self.ref:
            self.counts["mismatches"] += 1
            what = "missing" if not self.out.exists() else "differs or fails verify"
            self.problem("final", kill, f"the published output {what}")
        if self.staging.exists():
            self.problem("final", kill, "a staging directory is left after publishing")
        asides = [p.name for p in self.work.iterdir() if p.name.startswith(ASIDE)]
        if asides and (self.out / ".tadmerge").exists():
            # a publish killed after its rename: the next run for the output finishes
            # it (removes the old output it swapped out), then finds nothing to resume
            rc, err = self.cli(["merge", self.cfg, "--resume"])
            if rc != 2:
                self.problem("next run", kill, f"exit {rc}, not 2: {err.strip()[-300:]}")
            self.counts["publishes_finished_by_the_next_run"] += 1
            asides = [p.name for p in self.work.iterdir() if p.name.startswith(ASIDE)]
        if asides:
            self.leftovers.append({"trial": len(self.trials), "kill": kill, "left": asides})

    def count_kill(self, kill, overwrite: bool, run: str) -> None:
        phase = self.phase(overwrite)
        self.counts["kills"] += 1
        self.by_phase[phase] += 1
        label = kill[1].split(":")[0] if kill[0] == "point" else f"delay-from-{kill[1]}"
        self.by_point[("overwrite " if overwrite else "") + label] += 1
        self.trials[-1]["kills"].append({"kill": list(kill), "run": run, "phase": phase})

    # ------------------------------------------------------------ one trial

    def trial(self, kill: tuple, overwrite: bool = False, chain: list | None = None) -> dict:
        """Kill one merge as `kill` says, check, recover, check the published bytes.
        Returns the trial's record, its problems included."""
        n_problems = len(self.problems)
        record = {"kill": list(kill), "overwrite": overwrite, "kills": []}
        self.trials.append(record)
        self.clean()
        if overwrite:
            shutil.copytree(self.work / "old", self.out)
        flags = ["--overwrite"] if overwrite else []
        rc = self.killed_run(["merge", self.cfg, *flags], kill)
        if rc == -signal.SIGKILL:
            self.count_kill(kill, overwrite, "merge")
        else:
            self.counts["finished_before_the_kill"] += 1
        self.check_after_kill(kill, overwrite)
        self.recover(overwrite, kill, list(chain or []))
        self.check_final(kill)
        record["problems"] = self.problems[n_problems:]
        return record

    def random_kill(self, rng: random.Random) -> tuple:
        t = self.timing
        if rng.random() < 0.5:
            point = rng.choice(killpoints.POINTS)
            if point == "stats":
                point += f":{rng.randint(1, 6)}"
            elif point in ("units", "unit-written"):
                point += f":{rng.randint(1, self.total_units)}"
            return ("point", point)
        if rng.random() < 0.4:
            return ("delay", "start", round(rng.uniform(0, t["total_s"]), 3))
        tail = max(0.02, t["total_s"] - t.get("stats_saved_s", 0.0))
        return ("delay", "stats", round(rng.uniform(0, tail), 4))

    def summary(self) -> dict:
        return {
            "config": {"merge": "ties", "sparsify": "tadrop", "runtime": RUNTIME},
            "units": self.total_units,
            "reference_run": self.timing,
            "counts": {
                "kills": self.counts["kills"],
                "trials": len(self.trials),
                "finished_before_the_kill": self.counts["finished_before_the_kill"],
                "resumes": self.counts["resumes"],
                "reruns": self.counts["reruns"],
                "reruns_refused_naming_resume": self.counts["reruns_refused"],
                "changed_config_resumes_refused": self.counts["changed_config_resumes_refused"],
                "outputs_compared": self.counts["outputs_compared"],
                "mismatches": self.counts["mismatches"],
                "problems": len(self.problems),
                "leftover_old_outputs": len(self.leftovers),
            },
            "kills_by_phase": dict(sorted(self.by_phase.items())),
            "kills_by_point": dict(sorted(self.by_point.items())),
            "problems": self.problems,
            "leftovers": self.leftovers,
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=100, help="trials (first kills) to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    ap.add_argument("--chain", type=float, default=0.25,
                    help="probability that a recovery run is killed again")  # fmt: skip
    args = ap.parse_args()
    import tempfile

    from benchmarks.common import write_result

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="crash-soak-") as tmp:
        soak = Soak(args.work or Path(tmp))
        soak.prepare()
        for i in range(args.kills):
            overwrite = rng.random() < 1 / 3
            chain = []
            while rng.random() < args.chain and len(chain) < 2:
                chain.append(soak.random_kill(rng))
            rec = soak.trial(soak.random_kill(rng), overwrite, chain)
            status = "ok" if not rec["problems"] else f"{len(rec['problems'])} problem(s)"
            print(f"[{i + 1}/{args.kills}] {rec['kill']} overwrite={overwrite} "
                  f"kills={[k['phase'] for k in rec['kills']]}: {status}", flush=True)  # fmt: skip
        doc = soak.summary()
    doc["seed"] = args.seed
    path = write_result("crash_soak", doc)
    print(json.dumps(doc["counts"], indent=1))
    print(f"wrote {path}")
    return 0 if not doc["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
