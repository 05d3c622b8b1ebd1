#!/usr/bin/env bash
# The GPU checks, as one script for a machine with a CUDA device and a PyTorch that sees it (its own python3;
# the project's torch pin is for CPU machines). Each part has its own time limit, so one that fails or hangs
# leaves the others their numbers; logs and JSON go to $OUT (default results/gpu).
#
#   WHEELS=dir bash tools/gpu_check.sh   # dir: wheels of the serving dependencies the machine lacks
#                                        # (pyzmq, fastapi, pydantic, uvicorn...), installed with --no-deps
#   PARTS="overlap_default speculative" ...  # only these parts (default: all four)
#
# 1. tools/bench_gpu.py: the model and attention tests on the GPU, and decode ms/token of a Llama-3-8B-shaped
#    model at batch 1 and 64 against the weight-streaming floor.
# 2. tools/bench_overlap.py --device cuda: overlapped scheduling on and off, default and bench models, batch 1
#    and 16 (on a GPU the forward is short, so what the master does between steps is most of a step).
# 3. tools/bench_speculative.py --device cuda: n-gram speculation on and off, bench model, batch 1.
set -u
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
if [ -n "${WHEELS:-}" ]; then
    "$PYTHON" -m pip install -q --no-deps --no-index --target /tmp/llmserve-deps "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/llmserve-deps:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"

part() {  # part NAME SECONDS COMMAND...: run one part with its limit, its output in $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    case " ${PARTS:-overlap_default overlap_bench speculative bench_gpu} " in *" $name "*) ;; *) return ;; esac
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start))s"
}

part overlap_default 150 "$PYTHON" tools/bench_overlap.py --device cuda --config configs/default.yaml \
    --batch 1 16 --rounds 5 --output-len 96 --out "$OUT/overlap_default.json"
part overlap_bench 150 "$PYTHON" tools/bench_overlap.py --device cuda --config configs/bench.yaml \
    --batch 1 16 --rounds 5 --output-len 96 --out "$OUT/overlap_bench.json"
part speculative 150 "$PYTHON" tools/bench_speculative.py --device cuda --rounds 3 --output-len 128 \
    --workloads loop random --out "$OUT/speculative.json"
part bench_gpu 240 "$PYTHON" tools/bench_gpu.py --out "$OUT/gpu.json"
