#!/usr/bin/env bash
# Create the virtual environments of the tools tadmerge is compared against, in
# .bench-envs/ of the repository (git-ignored, like .venv; override with BENCH_ENVS).
# The cross-check tests (tests/test_crosscheck_*.py) find them there, or take the
# python named by TADMERGE_MERGEKIT_PYTHON / TADMERGE_FUSIONBENCH_PYTHON.
#
#   bash benchmarks/setup_envs.sh            # both
#   bash benchmarks/setup_envs.sh mergekit   # only mergekit
#   bash benchmarks/setup_envs.sh fusionbench
#
# torch is installed FIRST and pinned (TORCH_SPEC, default torch==2.13.0, the
# CPU wheel served locally), then the tool with a constraint file that holds
# torch at that version, so pip never pulls a multi-GB CUDA build.
# Neither mergekit (torch>=2.0) nor fusion-bench (torch unpinned) pins torch,
# so the constraint is all that is needed; no --no-deps.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
ENVS=${BENCH_ENVS:-$REPO/.bench-envs}
PY=${BENCH_PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
MERGEKIT_SPEC=${MERGEKIT_SPEC:-mergekit==0.1.5}
FUSIONBENCH_SPEC=${FUSIONBENCH_SPEC:-fusion-bench==0.2.33}
which_envs=${*:-mergekit fusionbench}

mkdir -p "$ENVS"
constraints="$ENVS/torch-constraint.txt"
echo "$TORCH_SPEC" >"$constraints"

make_env() {
    local name=$1 spec=$2 dir="$ENVS/$1"
    if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "import ${3}" 2>/dev/null; then
        echo "[setup_envs] $name already present in $dir"
        return 0
    fi
    echo "[setup_envs] creating $dir"
    "$PY" -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip
    "$dir/bin/pip" install -q "$TORCH_SPEC"
    "$dir/bin/pip" install -q -c "$constraints" "$spec"
    "$dir/bin/python" -c "import torch, ${3}; print('[setup_envs] $name ok, torch', torch.__version__)"
    "$dir/bin/pip" freeze >"$dir/freeze.txt"
}

for env in $which_envs; do
    case $env in
        mergekit) make_env mergekit "$MERGEKIT_SPEC" mergekit ;;
        fusionbench) make_env fusionbench "$FUSIONBENCH_SPEC" fusion_bench ;;
        *) echo "unknown env $env (mergekit | fusionbench)" >&2; exit 2 ;;
    esac
done
