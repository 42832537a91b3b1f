#!/usr/bin/env bash
# What to measure on a lent GPU machine (docs/benchmarks.md "Running the GPU check"), as one prepared script: `make
# bench-peer` on CUDA, both sides in bf16, in the order of what matters most, each part bounded by what is left of
# the budget, so that what was measured before the machine's time runs out comes back. Figures go to $OUT (the
# device tool's folder), else runs/bench-gpu: log (everything printed), reports.md (the tables), machine.txt.
#
#   bash scripts/bench_gpu.sh [SECONDS]     (default 500: the whole script's budget)
#
# The image has torch, transformers, accelerate and peft but neither datasets nor TRL: their wheels travel in .whl
# (docs/benchmarks.md says which) and are installed here into /tmp/carried/site-packages. Without TRL, rlhf's side
# alone runs.
set -u
out=${OUT:-runs/bench-gpu}
mkdir -p "$out"
rm -f "$out/log" "$out/reports.md" "$out/machine.txt"
budget=${1:-500}
py=python3
# The wheels go to a folder named site-packages: dill (which datasets fingerprints with) pickles a module by value,
# not by name, when its file is neither under the interpreter's prefix nor in a site-packages folder; under
# /tmp/site pyarrow was pickled by value and every Dataset.from_dict failed ("Can't pickle <class 'MonthDayNano'>").
site=/tmp/carried/site-packages
if [ -d .whl ]; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site .whl/*.whl || exit 1
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
$py -c "import datasets; datasets.Dataset.from_dict({'text': ['a b']}); print('datasets', datasets.__version__)" \
    >>"$out/machine.txt" 2>&1 || { echo "datasets cannot build a Dataset here: see $out/machine.txt"; exit 1; }
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $py -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
        'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
} >>"$out/machine.txt" 2>&1
sides=rlhf,trl
$py -c "import trl; print('trl', trl.__version__)" >>"$out/machine.txt" 2>&1 || sides=rlhf

bounded() { # NAME CAP COMMAND...: run COMMAND for at most CAP seconds and what is left of the budget
    local name=$1 left=$((budget - SECONDS))
    local cap=$((left < $2 ? left : $2))
    shift 2
    if [ "$cap" -lt 40 ]; then
        echo "[bench-gpu] $name: not run, ${left} s of the budget left" | tee -a "$out/log"
        return
    fi
    echo "[bench-gpu] $name (for at most ${cap} s; ${left} s of the budget left)" | tee -a "$out/log"
    timeout --kill-after=10 "$cap" "$@" 2>&1 | tee -a "$out/log"
}

peer() { # NAME BENCH_PEER_ARGS...: one bench-peer invocation, both sides on the GPU; its tables to reports.md
    local name=$1
    shift
    rm -f runs/bench-peer/report-*.md
    bounded "$name (sides $sides)" "$budget" $py scripts/bench_peer.py --device cuda --peer-python $py --sides $sides "$@"
    { echo "## $name"; cat runs/bench-peer/report-*.md 2>/dev/null; echo; } >>"$out/reports.md"
}

peer "PPO, tiny, bf16" --precision bf16 --workloads ppo --reps 3
# the tiny pipeline end to end on CUDA (the recipe as it is: mixed_precision auto, so bf16), its eval line against
# the CPU's; on a fresh tree (a lent machine's): the pipeline skips the stages runs/tiny already holds
bounded "make demo on the GPU" 180 env PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" $py scripts/demo.py
peer "SFT and RM, tiny, bf16" --precision bf16 --workloads sft,rm --reps 2
peer "GRPO (TRL's defaults), tiny, bf16" --precision bf16 --workloads grpo --reps 2
peer "variable lengths, tiny, bf16" --precision bf16 --workloads sftvar,rmk4var --reps 2
peer "PPO, small, bf16" --size small --precision bf16 --workloads ppo --reps 1
echo "[bench-gpu] done in ${SECONDS} s" | tee -a "$out/log"
