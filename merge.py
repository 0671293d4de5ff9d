"""Ray job / script entry point: `python merge.py CONFIG.yaml [--resume] [...]`.

Same as `tadmerge merge CONFIG.yaml`. With no argument it runs the demo (small
checkpoints built locally, merged with EMR + TADrop). On a cluster:
`ray job submit --working-dir . -- python merge.py CONFIG.yaml`.
"""

import sys

from tadmerge.cli import run

if __name__ == "__main__":
    argv = sys.argv[1:]
    commands = {
        "merge",
        "plan",
        "verify",
        "info",
        "materialize",
        "report",
        "methods",
        "kernels",
        "push",
    }
    if not argv:
        argv = ["demo"]
    elif argv[0] not in commands | {"demo"} and not argv[0].startswith("-"):
        argv = ["merge", *argv]
    run(argv)
