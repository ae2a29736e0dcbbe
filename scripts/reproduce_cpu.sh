#!/usr/bin/env bash
# Reproduce every paper table at CPU scale: run each `_cpu` experiment (conf/experiment/*_cpu.yaml) into
# runs/reproduce/EXPERIMENT/, then write docs/results.md with the tables sift-table makes of them, beside the
# papers' numbers, their plots, the exact commands and the wall times.
#
#   SIFT_DATA_DIR=/path/to/data scripts/reproduce_cpu.sh                 # everything (many hours on 2 cores)
#   SIFT_DATA_DIR=/path/to/data scripts/reproduce_cpu.sh sift_glue_cpu   # some experiments
#   SIFT_DATA_DIR=/path/to/data scripts/reproduce_cpu.sh sam_glue_superglue_cpu -- seed=1   # a slice of one
#
# With several cores, run one single-threaded job per core:
#   OMP_NUM_THREADS=1 SIFT_DATA_DIR=... scripts/reproduce_cpu.sh sam_glue_superglue_cpu -- hydra/launcher=joblib \
#       hydra.launcher.n_jobs=2
# Overrides after `--` go to every sift-run and into the command the report shows. The data root holds glue/,
# superglue/ (cb, copa, wsc), alpaca/ and mmlu/ (see README.md, Data). Running it again continues: completed
# jobs are skipped (skip_completed=true) and unfinished ones resume from their checkpoints. REPRODUCE_DIR
# changes where the runs go; docs/results.md is rewritten from all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${SIFT_DATA_DIR:?set SIFT_DATA_DIR to a local data root (glue/, superglue/, alpaca/, mmlu/)}"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
OUT=${REPRODUCE_DIR:-runs/reproduce}
PYTHON=${PYTHON:-python}

# Cheapest first, so a run cut short still reports the most tables.
ALL=(sift_memory_cpu graft_lmbff_table_cpu pac_glue_table_cpu sift_glue_cpu design_spaces_glue_cpu
     sift_instruct_cpu sam_glue_superglue_cpu)
EXPERIMENTS=() OVERRIDES=()
while (($#)); do
    if [[ $1 == -- ]]; then shift; OVERRIDES=("$@"); break; fi
    EXPERIMENTS+=("$1"); shift
done
((${#EXPERIMENTS[@]})) || EXPERIMENTS=("${ALL[@]}")

run() {  # EXPERIMENT COMMAND...: run it, and keep the command and its wall time for the report
    local exp=$1; shift
    mkdir -p "$OUT/$exp"
    echo "$*" > "$OUT/$exp/command.txt"
    local start=$SECONDS status=0
    echo "== $exp: $*" >&2
    "$@" || status=$?
    printf '{"elapsed_s": %d, "exit_code": %d, "finished": "%s"}\n' "$((SECONDS - start))" "$status" \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$OUT/$exp/invocation.json"
}

for exp in "${EXPERIMENTS[@]}"; do
    if [[ $exp == sift_memory_cpu ]]; then
        run "$exp" sift-bench --models minilm-l6 --methods full_ft lora sift --batch 16 --seqs 128 \
            --override "experiment=$exp" --output "$OUT/$exp"
        sift-memory --paper sift-llama7b > "$OUT/$exp/paper.md" || true
    else
        run "$exp" sift-run -m "experiment=$exp" skip_completed=true "runs_dir=$OUT/$exp" "${OVERRIDES[@]}"
    fi
done

"$PYTHON" scripts/results_report.py --runs "$OUT" --output docs/results.md
