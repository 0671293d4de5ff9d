"""Typed errors with exit codes.

Every error a user can meet says *what* and *where*: the file, the tensor and the
problem. Input problems are collected and raised together so a nightly job's log
shows everything that is wrong at once, not the first thing only.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_CONFIG = 2  # the config (or a CLI flag) is wrong
EXIT_INPUT = 3  # an input checkpoint is missing, malformed or disagrees with the others
EXIT_RUNTIME = 4  # the merge failed while running (I/O error, disk full, worker lost too often)
EXIT_INTERRUPTED = 130  # Ctrl-C; the staging directory is kept for --resume


class TadmergeError(Exception):
    """Base class: every error the engine raises on purpose."""

    exit_code = EXIT_RUNTIME


class ConfigError(TadmergeError):
    """The config or a CLI override is invalid; names the key and why."""

    exit_code = EXIT_CONFIG


@dataclass(frozen=True)
class InputProblem:
    """One problem with one input: which file, which tensor (if any), what."""

    file: str
    tensor: str | None
    message: str

    def __str__(self) -> str:
        file = printable(self.file)
        where = file if self.tensor is None else f"{file} [{printable(self.tensor, 200)}]"
        return f"{where}: {printable(self.message, 2000)}"


def printable(text: str, limit: int = 4096) -> str:
    """Escape control characters (a tensor name with a newline must not forge log
    lines) and clip hostile lengths."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return out if len(out) <= limit else out[: limit - 1] + "…"


class InputError(TadmergeError):
    """One or more input problems, all reported together."""

    exit_code = EXIT_INPUT

    def __init__(self, problems: list[InputProblem] | InputProblem):
        if isinstance(problems, InputProblem):
            problems = [problems]
        self.problems = list(problems)
        lines = [str(p) for p in self.problems]
        head = f"{len(lines)} input problem(s)" if len(lines) > 1 else "input problem"
        if len(lines) == 1:
            super().__init__(f"{head}: {lines[0]}")
        else:
            super().__init__(head + ":\n  " + "\n  ".join(lines))

    def __reduce__(self):
        # rebuilt from the problems, not the message (Ray sends a worker's errors
        # pickled: BaseException's default would pass the text as the problems)
        return (self.__class__, (self.problems,))


class MergeRuntimeError(TadmergeError):
    """The merge failed while running; the staging directory is kept for --resume."""

    exit_code = EXIT_RUNTIME


class OutputError(TadmergeError):
    """The output path is unusable (exists without --overwrite, inside an input, ...)."""

    exit_code = EXIT_CONFIG


class VerifyError(TadmergeError):
    """A published output does not match its manifest."""

    exit_code = EXIT_INPUT


class InputChangedError(InputError):
    """An input file changed after the merge planned it (in place, replaced, or
    rewritten with its size and mtime kept): what was read from it may mix two
    versions, so nothing is published. Exit 3, like every input problem."""
