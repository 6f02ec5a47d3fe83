#!/usr/bin/env bash
# Issue #20's device check: one command for one lent-GPU call, sized for about 6 minutes on an H200 (at most 9.5
# minutes: every part has a time limit).
#   1. Breakout, the short protocol of RESULTS.md section 10 on the GPU with --cudagraphs, seeds 1 and 2 (at most 4
#      minutes each), in the background (learning runs, not timings); meanwhile the CUDA tests.
#   2. Then, alone on the machine: training-phase SPS of both Atari scripts, eager and --cudagraphs, at 8 and 16 envs,
#      with the update cost of each at 8 envs (COMPILE=1 adds --cudagraphs --compile at 8 envs).
# Everything lands under $OUT (default benchmarks/results/gpu_check): JSONs, logs, the runs' summary.json and events.
#   bash benchmarks/gpu_check.sh    # on the device, after the wheels of ../shared/device/README.md, made with
#                                   # bash ../shared/device/prepare_wheels.sh tabulate==0.10.0 (benchmarks' tables)
set -u
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${OUT:-benchmarks/results/gpu_check}")
PY=${PYTHON:-python3}
$PY -c "import ale_py, gymnasium, tabulate, tyro" || { echo "error: install the carried wheels first (see above)" >&2; exit 2; }
mkdir -p "$OUT/logs" "$OUT/short"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/logs/gpu.txt" 2>&1
git rev-parse HEAD > "$OUT/logs/commit.txt" 2>&1

# 1. the short protocol (its flags, but on the GPU, graphed, and no 0.7 GB replay checkpoints)
PROTOCOL=$($PY -c "from benchmarks.common import PROTOCOL; print(' '.join(f for f in PROTOCOL if f != '--no-cuda'))")
short=()
for seed in 1 2; do
  (cd "$OUT/short" && timeout 240 $PY "$OLDPWD/dqn_atari.py" --env-id BreakoutNoFrameskip-v4 --seed $seed $PROTOCOL \
    --cuda --cudagraphs --checkpoint-frequency 0 --no-checkpoint-buffer --run-name "breakout_graphs_$seed" \
    > "$OUT/logs/short_seed$seed.log" 2>&1; echo "exit $?" >> "$OUT/logs/short_seed$seed.log") &
  short+=($!)
done
timeout 240 $PY -m pytest -q -rs tests/test_atari.py tests/test_per.py -k cuda -p no:cacheprovider \
  > "$OUT/logs/pytest_cuda.txt" 2>&1
echo "pytest exit $?" >> "$OUT/logs/pytest_cuda.txt"
wait "${short[@]}"
find "$OUT/short" -name "*.pt" -delete  # final weights: not needed here, and large

# 2. timings, alone: 5k steps, updates from 1k (1,000 updates), 1-episode final evaluation
SPS=(-m benchmarks.measure sps --cuda --scripts dqn_atari.py dqn_atari_dueling_per.py --total-timesteps 5000
     --learning-starts 1000 --out-dir "$OUT")
for envs in 8 16; do
  iters=$([ $envs = 8 ] && echo 300 || echo 0)  # the update cost once, at 8 envs
  timeout 80 $PY "${SPS[@]}" --num-envs $envs --update-iters $iters --out "$OUT/sps_eager_$envs.json" \
    > "$OUT/logs/sps_eager_$envs.log" 2>&1
  timeout 80 $PY "${SPS[@]}" --num-envs $envs --update-iters $iters --cudagraphs \
    --out "$OUT/sps_graphs_$envs.json" > "$OUT/logs/sps_graphs_$envs.log" 2>&1
done
if [ "${COMPILE:-0}" = 1 ]; then
  timeout 200 $PY "${SPS[@]}" --num-envs 8 --update-iters 0 --cudagraphs --compile \
    --out "$OUT/sps_graphs_compile_8.json" > "$OUT/logs/sps_graphs_compile_8.log" 2>&1
fi
rm -rf "$OUT/sps"/runs/*/*.pt

# the summary: the CUDA tests' last line, each SPS table (its ms/update column: the update cost), the short runs' ends
{ tail -n 2 "$OUT/logs/pytest_cuda.txt"; grep -H -A3 "^| script" "$OUT"/logs/sps_*.log
  grep -H "eval return\|^exit" "$OUT"/logs/short_seed*.log; } | tee "$OUT/summary.txt"
