"""Crash soak, small: merges SIGKILLed at a dozen points, then recovered.

The loop of benchmarks/crash_soak.py (see there for what is checked after each
kill), on a tiny zoo merged with TIES + TADrop in split units: each case kills
`python -m tadmerge.cli merge` (tests/killpoints.py, or a random delay), then
checks that whatever holds the output name is a verified complete output, that a
left staging directory refuses a plain rerun (exit 2 naming --resume) and a
--resume with another config (exit 2, "changed"), and that --resume or a rerun
(run in this process) publishes the bytes of the uninterrupted merge, leaving no
staging directory nor old output behind.

Every case must recover: the publish window (the fingerprint kept until the
output is in place), the atomic --overwrite swap and the removal of the replaced
output are what the kills between publish's steps check.
"""

from __future__ import annotations

import random

import pytest

from benchmarks.crash_soak import Soak, in_process_cli

pytestmark = pytest.mark.slow

# (kill, --overwrite, kills of the recovery runs)
CASES = [
    pytest.param(("point", "staging"), False, [], id="after-plan-staging-created"),
    pytest.param(("point", "stats:2"), False, [], id="mid-statistics"),
    pytest.param(("point", "unit-written:2"), False, [], id="unit-written-not-logged"),
    pytest.param(("point", "units:5"), False, [("point", "units:3")], id="resume-killed-too"),
    pytest.param(("point", "finalize"), False, [], id="finalize"),
    pytest.param(("point", "after-manifest"), False, [], id="publish-after-manifest"),
    pytest.param(("point", "before-rename"), False, [], id="publish-before-rename"),
    pytest.param(("point", "after-rename"), False, [], id="publish-after-rename"),
    pytest.param(("point", "before-state-removal"), False, [], id="publish-state-removal"),
    pytest.param(("point", "units:5"), True, [], id="overwrite-mid-apply"),
    pytest.param(("point", "before-rename"), True, [], id="overwrite-before-rename"),
    pytest.param(("point", "after-rename"), True, [], id="overwrite-after-rename"),
    pytest.param(("point", "before-state-removal"), True, [], id="overwrite-state-removal"),
]  # fmt: skip


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    s = Soak(tmp_path_factory.mktemp("soak"), cli=in_process_cli)
    s.prepare()
    return s


@pytest.mark.parametrize("kill, overwrite, chain", CASES)
def test_killed_merge_recovers_to_the_same_bytes(soak, kill, overwrite, chain):
    rec = soak.trial(kill, overwrite, chain)
    assert [k["kill"] for k in rec["kills"]] == [list(kill), *map(list, chain)], "kill missed"
    assert rec["problems"] == []  # the final output's bytes among them
    assert not [x for x in soak.leftovers if x["trial"] == len(soak.trials)]


@pytest.mark.parametrize("seed", [0])
def test_random_kills(soak, seed):
    """Random kills: a random kill point or a SIGKILL after a random delay (from the
    start, or from the statistics' save), a resume killed again now and then."""
    rng = random.Random(seed)
    for _ in range(3):
        overwrite = rng.random() < 1 / 3
        chain = [soak.random_kill(rng)] if rng.random() < 0.5 else []
        rec = soak.trial(soak.random_kill(rng), overwrite, chain)
        assert rec["problems"] == [], rec
