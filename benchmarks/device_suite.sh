#!/usr/bin/env bash
# Everything a GPU check of the CUDA backend needs, in one call (one cold machine, one JIT build):
# build both extensions, run the CUDA tests, the sanitizer, then the benchmarks; logs go to $OUT
# (default ./device_out). Steps are selected by name, e.g.
#
#   benchmarks/device_suite.sh build tests fwd_fp32 bwd_memory
#
# Steps: build, tests, sanitizer, sanitizer_fp32, fwd_quick, fwd_sweep, fwd_fp32, bwd, bwd_fp32, bwd_memory, bwd_flex,
# bwd_opt_in (the backward opt-ins in $BWD_OPT_IN, by default -DHYPTORCH_BWD_D128_PREFETCH=1
# -DHYPTORCH_BWD_FULL_TILE_LOADS=1 -DHYPTORCH_BWD_OVERWRITE_FIRST=1 -DHYPTORCH_BWD_D128_DQ_WGMMA=1
# -DHYPTORCH_BWD_ACOSH_RSQRT=1 -DHYPTORCH_BWD_PAIR_ROUND=1 -DHYPTORCH_BWD_TMA_LOADS=1: the tests and the bf16
# sanitizer with all of them, a same-process A/B of the default against each and against all of them, its builds
# overlapping the tests, ~8 min; if the tests failed, the bf16 gradient checks with each one alone), bwd_mma_sync
# (the backward tests with the mma.sync kernel that GPUs other than sm_90a run, -DHYPTORCH_BWD_WGMMA=0), bwd_ab (same-process A/B of the backward against
# its switchable paths turned off one at a time: dev/ab_bwd_opt_in.py), bwd_ncu (Nsight Compute on the backward's
# kernel 1 at D = 64 and 128: stall reasons, scheduler and memory statistics, the hottest SASS lines), fwd_opt_in
# (the forward opt-ins in $FWD_OPT_IN, by default -DHYPTORCH_FWD_DESC_LO=1 -DHYPTORCH_FWD_HILO_ONE_GROUP=1: the
# forward and backward tests with both, a same-process A/B of the default against each).
# Each step has its own time limit and a failing step does not stop the next ones; the script exits
# non-zero if any step failed. On the lent device, install geoopt first (the device README's notes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date +%T))"
  if ! timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1; then
    failed+=("$name")
  fi
  tail -n 20 "$OUT/$name.txt"
}

(($#)) || set -- build tests
for name in "$@"; do
  case $name in
    build) step build 300 python3 -c "from hyptorch_flash.ops import cuda_build, cuda_backward
cuda_build.load(); cuda_backward.load_extension()" ;;
    tests) step tests 400 python3 -m pytest -q -p no:warnings tests/test_cuda_forward.py tests/test_cuda_backward.py tests/test_out_dtype.py \
      tests/test_layers_cuda.py tests/test_training_cuda.py ;;
    sanitizer) PYTORCH_NO_CUDA_MEMORY_CACHING=1 step sanitizer 480 compute-sanitizer --tool memcheck \
      --error-exitcode 1 python3 tests/cuda_sanitizer_cases.py bfloat16 float16 ;;
    sanitizer_fp32) PYTORCH_NO_CUDA_MEMORY_CACHING=1 step sanitizer_fp32 400 compute-sanitizer --tool memcheck \
      --error-exitcode 1 python3 tests/cuda_sanitizer_cases.py float32 ;;
    fwd_quick) step fwd_quick 300 python3 benchmarks/bench_attention.py --quick --out "$OUT/fwd_quick.jsonl" ;;
    fwd_sweep) step fwd_sweep 400 python3 benchmarks/bench_attention.py --out "$OUT/fwd.jsonl" \
      --plot "$OUT/cuda_forward_sweep.png" ;;
    fwd_fp32) step fwd_fp32 200 python3 benchmarks/bench_attention.py --fp32-only --out "$OUT/fwd_fp32.jsonl" ;;
    bwd) step bwd 300 python3 benchmarks/bench_cuda_backward.py --iters 10 --profile \
      --scores sdpa lorentz_dot lorentz_dot:one_pass euclidean distance ;;
    bwd_fp32) step bwd_fp32 200 python3 benchmarks/bench_cuda_backward.py --dtype float32 --batch 8 --heads 12 \
      --n 1024 --dims 64 128 --causal --iters 10 --scores sdpa lorentz_dot distance ;;
    bwd_memory) step bwd_memory 200 python3 benchmarks/bench_cuda_backward.py --dims 64 --scores sdpa \
      --iters 3 --memory-n 16384 ;;
    bwd_flex) step bwd_flex 300 python3 benchmarks/bench_cuda_backward.py --dims 64 \
      --scores distance flex_distance --iters 5 ;;
    bwd_opt_in)  # $BWD_OPT_IN: the opt-ins' nvcc flags, tested together and A/B'd one by one
      BWD_OPT_IN=${BWD_OPT_IN:--DHYPTORCH_BWD_D128_PREFETCH=1 -DHYPTORCH_BWD_FULL_TILE_LOADS=1 -DHYPTORCH_BWD_OVERWRITE_FIRST=1 -DHYPTORCH_BWD_D128_DQ_WGMMA=1 -DHYPTORCH_BWD_ACOSH_RSQRT=1 -DHYPTORCH_BWD_PAIR_ROUND=1 -DHYPTORCH_BWD_TMA_LOADS=1}
      read -ra opt_in_flags <<<"$BWD_OPT_IN"
      opt_in_flags+=("$BWD_OPT_IN")  # (and all of them together)
      # the A/B's extensions (one per setting) compile on the CPUs while the tests run on the GPU
      (cd dev && timeout 500 python3 ab_bwd_opt_in.py --build-only "" "${opt_in_flags[@]}") \
        >"$OUT/bwd_opt_in_ab_build.txt" 2>&1 &
      ab_build=$!
      HYPTORCH_FLASH_NVCC_EXTRA=$BWD_OPT_IN step bwd_opt_in_tests 400 python3 -m pytest -q \
        --maxfail=40 -p no:warnings tests/test_cuda_backward.py tests/test_out_dtype.py
      HYPTORCH_FLASH_NVCC_EXTRA=$BWD_OPT_IN PYTORCH_NO_CUDA_MEMORY_CACHING=1 step bwd_opt_in_sanitizer 200 \
        compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/cuda_sanitizer_cases.py bfloat16
      wait "$ab_build" || failed+=(bwd_opt_in_ab_build)
      step bwd_opt_in_ab 400 bash -c 'cd dev && python3 ab_bwd_opt_in.py "" "$@"' _ "${opt_in_flags[@]}"
      if [[ " ${failed[*]} " == *" bwd_opt_in_tests "* ]]; then
        # which one: the bf16 gradient checks with each alone (built already, for the A/B)
        for flag in "${opt_in_flags[@]::${#opt_in_flags[@]}-1}"; do
          single=${flag#-DHYPTORCH_BWD_}
          HYPTORCH_FLASH_NVCC_EXTRA=$flag step "bwd_opt_in_only_${single%%=*}" 120 python3 -m pytest -q \
            -p no:warnings tests/test_cuda_backward.py -k "within_twice and bfloat16"
        done
      fi ;;
    bwd_mma_sync)
      HYPTORCH_FLASH_NVCC_EXTRA=-DHYPTORCH_BWD_WGMMA=0 step bwd_mma_sync_tests 400 python3 -m pytest -q \
        --maxfail=40 -p no:warnings tests/test_cuda_backward.py ;;
    bwd_ab) step bwd_ab 540 bash -c 'cd dev && python3 ab_bwd_opt_in.py "" "-DHYPTORCH_BWD_WGMMA=0" \
      "-DHYPTORCH_BWD_EARLY_SCORES=0" "-DHYPTORCH_BWD_WGMMA_D128=0" "-DHYPTORCH_BWD_D64_ARCCOSH_BLOCK_M=32"' ;;
    bwd_ncu)  # kernel 1's warp stall reasons, D = 64 and 128 (lorentz_dot), $BWD_NCU_FLAGS: extra nvcc flags
      for d in 64 128; do
        HYPTORCH_FLASH_NVCC_EXTRA=${BWD_NCU_FLAGS:-} step "bwd_ncu_d$d" 300 ncu -k regex:attention_bwd_kv \
          --launch-skip 1 --launch-count 1 --section SpeedOfLight --section Occupancy --section SchedulerStats \
          --section WarpStateStats --section SourceCounters --section MemoryWorkloadAnalysis --print-details all \
          --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
          python3 dev/one_fwd_bwd.py "$d"
      done ;;
    fwd_opt_in)  # $FWD_OPT_IN: the forward opt-ins' nvcc flags, tested together and A/B'd one by one
      FWD_OPT_IN=${FWD_OPT_IN:--DHYPTORCH_FWD_DESC_LO=1 -DHYPTORCH_FWD_HILO_ONE_GROUP=1}
      read -ra fwd_flags <<<"$FWD_OPT_IN"
      HYPTORCH_FLASH_NVCC_EXTRA=$FWD_OPT_IN step fwd_opt_in_tests 400 python3 -m pytest -q -x \
        -p no:warnings tests/test_cuda_forward.py tests/test_out_dtype.py tests/test_cuda_backward.py
      step fwd_opt_in_ab 300 bash -c 'cd dev && python3 ab_fwd_tiles.py "" "$@"' _ "${fwd_flags[@]}" ;;
    *) echo "unknown step: $name"; failed+=("$name") ;;
  esac
done

if ((${#failed[@]})); then
  echo "FAILED steps: ${failed[*]}"
  exit 1
fi
