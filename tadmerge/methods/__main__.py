"""python -m tadmerge.methods README.md: regenerate the README's method reference."""

import sys

from .registry import update_readme

print(
    "updated" if update_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md") else "up to date"
)
