#!/usr/bin/env bash
# The GPU machine's check: build collab_ops with CUDA, run the tests, run the benchmarks.
#
#   bench/device_check.sh OUTDIR
#
# That machine has no network: nothing is installed from an index; peer libraries come from
# wheels in .whl/ when present. Each step logs to OUTDIR/<step>.log and OUTDIR/summary.txt, under a
# timeout drawn from one overall budget (DEVICE_CHECK_BUDGET_S, default 420 s) that holds back
# BENCH_RESERVE_S (default 150 s) for the benchmarks. A failed step does not stop the later ones;
# the script exits non-zero when any step failed.
#
# BENCH_ARGS adds options to the benchmark run (e.g. "--no-compile" or "--only fusion").
# DEVICE_CHECK_TESTS narrows the GPU tests (pytest arguments, default "tests/gpu").
# DEVICE_CHECK_STEPS picks the steps after the build (default "tests bench hf"): "hf" runs
# bench/hf_bench.py (the processors' per-step cost, the DistillationTrainer step against a
# full-logits Trainer); "profile" runs bench/profile_gpu.py and, where Nsight Compute can read the
# counters, ncu on its cases whose names contain one of the '|'-separated NCU_CASES (default
# "B=128|B=64|grid=21": the B=128 fusion kernels, speculative_verify at B=64, dynamic fusion;
# "none" skips ncu); "kdsweep" times kd_loss with the Triton row kernel's persistent program counts
# (bench/kd_triton_targets.py --programs).
# DEVICE_CHECK_ARCHIVE=FILE.tgz (an absolute path outside OUTDIR) packs OUTDIR into FILE after every
# step, so that a run cut short still hands everything back in one file (the device tool returns
# only a few files).
set -u -o pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."

BUDGET_S=${DEVICE_CHECK_BUDGET_S:-420}
BENCH_RESERVE_S=${BENCH_RESERVE_S:-150}
START=$(date +%s)
FAILED=()
: > "$OUT/summary.txt"

seconds_left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# run_step NAME CAP_S RESERVE_S COMMAND...
# Runs COMMAND under a timeout of min(CAP_S, seconds left - RESERVE_S), logging to OUTDIR/NAME.log.
run_step() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  local limit=$(( $(seconds_left) - reserve ))
  (( limit > cap )) && limit=$cap
  if (( limit < 5 )); then
    echo "$name: NOT RUN, the time budget is spent" | tee -a "$OUT/summary.txt"
    FAILED+=("$name")
    return 1
  fi
  echo "== $name (timeout ${limit}s)"
  local began rc verdict
  began=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  if (( rc == 0 )); then
    verdict="ok"
  elif (( rc == 124 || rc == 137 )); then
    verdict="TIMED OUT after ${limit}s"
  else
    verdict="FAILED (exit $rc)"
  fi
  echo "$name: $verdict in $(( $(date +%s) - began ))s" | tee -a "$OUT/summary.txt"
  if (( rc != 0 )); then
    FAILED+=("$name")
    tail -n 30 "$OUT/$name.log" | sed 's/^/    /'
  fi
  archive
  return $rc
}

archive() {
  if [[ -n ${DEVICE_CHECK_ARCHIVE:-} ]]; then
    tar czf "$DEVICE_CHECK_ARCHIVE.partial" -C "$OUT" . && mv "$DEVICE_CHECK_ARCHIVE.partial" "$DEVICE_CHECK_ARCHIVE"
  fi
}

run_step environment 60 "$BENCH_RESERVE_S" bash -c '
  set -e -o pipefail
  nvidia-smi
  nvcc --version || echo "nvcc: not on PATH"
  python3 -c "
import platform, torch, triton, transformers
print(\"python\", platform.python_version())
print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, torch.cuda.get_device_name(0))
print(\"triton\", triton.__version__, \"transformers\", transformers.__version__)
"'
tail -n 4 "$OUT/environment.log"

run_step build 240 "$BENCH_RESERVE_S" env COLLAB_OPS_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a \
  python3 -m pip install --no-build-isolation --no-deps --no-index -e .

run_step import 60 "$BENCH_RESERVE_S" python3 -c 'import collab_ops; print(collab_ops.backend_status())'
cat "$OUT/import.log"

# transformers.Trainer (DistillationTrainer and its tests) needs accelerate; that machine may lack it
# and cannot reach an index, so its wheel (and psutil's) may be carried in .whl/.
if ! python3 -c "import accelerate" 2> /dev/null; then
  shopt -s nullglob
  trainer_wheels=(.whl/accelerate-*.whl .whl/psutil-*.whl)
  shopt -u nullglob
  if (( ${#trainer_wheels[@]} )) && run_step accelerate 60 "$BENCH_RESERVE_S" \
      python3 -m pip install --no-index --no-deps --target /tmp/trainer-site "${trainer_wheels[@]}"; then
    export PYTHONPATH="/tmp/trainer-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "accelerate: not installed; the DistillationTrainer GPU tests skip" | tee -a "$OUT/summary.txt"
  fi
fi

STEPS=" ${DEVICE_CHECK_STEPS:-tests bench hf} "
wants() { [[ $STEPS == *" $1 "* ]]; }

if wants profile; then
  run_step profile 150 "$BENCH_RESERVE_S" python3 bench/profile_gpu.py "$OUT/profile_gpu.json"
  NCU_CASES=${NCU_CASES:-B=128|B=64|grid=21}
  if [[ $NCU_CASES == none ]]; then
    :
  elif command -v ncu > /dev/null; then
    # WarpStateStats and the stall metrics name the dominant stall (cycles per issued instruction
    # spent in each reason), ComputeWorkloadAnalysis the busiest pipe.
    stalls=""
    for reason in long_scoreboard short_scoreboard wait math_pipe_throttle lg_throttle mio_throttle barrier \
        branch_resolving no_instruction not_selected; do
      stalls+="${stalls:+,}smsp__average_warps_issue_stalled_${reason}_per_issue_active.ratio"
    done
    run_step ncu 120 "$BENCH_RESERVE_S" ncu --profile-from-start off --section SpeedOfLight --section Occupancy \
      --section LaunchStats --section MemoryWorkloadAnalysis --section WarpStateStats \
      --section ComputeWorkloadAnalysis --metrics "$stalls" python3 bench/profile_gpu.py --once "$NCU_CASES"
  else
    echo "ncu: not on PATH" | tee -a "$OUT/summary.txt"
  fi
fi

wants kdsweep && run_step kd_programs 120 "$BENCH_RESERVE_S" python3 bench/kd_triton_targets.py --programs \
  --out "$OUT/kd_programs.json"

# shellcheck disable=SC2086  # DEVICE_CHECK_TESTS is a list of pytest arguments
wants tests && run_step tests_gpu 240 "$BENCH_RESERVE_S" python3 -m pytest -q -p no:cacheprovider --durations=10 \
  ${DEVICE_CHECK_TESTS:-tests/gpu}
wants tests && tail -n 1 "$OUT/tests_gpu.log"
# The CPU suite runs in CI; here it is optional (DEVICE_CHECK_FULL_SUITE=1) to leave the time to the
# GPU tests and the benchmarks. The wheel test rebuilds the extension, so it stays in CI.
if [[ ${DEVICE_CHECK_FULL_SUITE:-0} == 1 ]]; then
  run_step tests_all 240 "$BENCH_RESERVE_S" python3 -m pytest -q tests --ignore=tests/test_wheel.py
  tail -n 1 "$OUT/tests_all.log"
fi

wants hf && run_step hf_bench 240 "$BENCH_RESERVE_S" python3 bench/hf_bench.py "$OUT/hf_bench.json"
wants hf && [[ -e $OUT/hf_bench.md ]] && cat "$OUT/hf_bench.md"

# Only the peers' own wheels: anything else in .whl/ on PYTHONPATH could shadow this machine's
# torch or the editable collab_ops.
shopt -s nullglob
peer_wheels=(.whl/liger_kernel*.whl .whl/flashinfer*.whl)
shopt -u nullglob
if ! wants bench; then
  :
elif (( ${#peer_wheels[@]} )); then
  if run_step peers 60 "$BENCH_RESERVE_S" python3 -m pip install --no-index --no-deps --target /tmp/site "${peer_wheels[@]}"; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  echo "peers: no Liger-Kernel or FlashInfer wheel in .whl/; the benchmarks record them as not installed" | tee -a "$OUT/summary.txt"
fi
# FlashInfer's speculative sampling kernel, prebuilt by bench/peers/build_flashinfer_chain.sh (its
# package would compile kernels at first use and needs an index this machine lacks).
if wants bench; then
  if [[ -e .whl/flashinfer_chain_sampling.so ]]; then
    echo "peers: FlashInfer chain kernel $(cat .whl/flashinfer_chain_sampling.json 2> /dev/null | tr -d '\n')" | tee -a "$OUT/summary.txt"
  else
    echo "peers: .whl/flashinfer_chain_sampling.so not built; FlashInfer's speculative column stays empty" | tee -a "$OUT/summary.txt"
  fi
fi

# The harness starts no new case once its own budget is spent and writes its files after every
# case, so a cut-short run still leaves results in OUTDIR.
bench_budget=$(( $(seconds_left) - 60 ))
(( bench_budget < 10 )) && bench_budget=10
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
wants bench && run_step bench 600 0 python3 -m collab_ops bench --device cuda --out "$OUT" --time-budget "$bench_budget" ${BENCH_ARGS:-}
for table in "$OUT"/*.md; do
  [[ -e $table ]] && cat "$table"
done

echo
echo "total: $(( $(date +%s) - START ))s of a ${BUDGET_S}s budget" | tee -a "$OUT/summary.txt"
archive
cat "$OUT/summary.txt"
if (( ${#FAILED[@]} )); then
  echo "failed steps: ${FAILED[*]}"
  exit 1
fi
