#!/usr/bin/env bash
# One device call: environment, GPU tests, then the requested benchmarks; results under $OUT.
#   bash bench/gpu_session.sh tests ablations e2e kernels profile ncu sweep targets
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || export PYTHONPATH=$PWD
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/env.txt"
for stage in "$@"; do
  echo "=== $stage"; t0=$(date +%s)
  case $stage in
    tests) timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -v -rf --timeout ${TEST_TIMEOUT:-240} --durations 12 ${TESTS:-tests/gpu tests/ops} 2>&1 | tee "$OUT/tests.txt" | tail -60 ;;
    ablations) rm -rf /tmp/abl; timeout ${ABL_TIMEOUT:-480} python3 bench/train_ablations.py --out /tmp/abl --steps ${ABL_STEPS:-120} --parallel ${ABL_PAR:-1} \
                 --batch-size 16 --seq-len 512 2>&1 | tail -30 | tee "$OUT/ablations.txt";
               cp /tmp/abl/summary.json "$OUT/ablations.json"; cp /tmp/abl/compare.png "$OUT/ablations.png" ;;
    kernels) timeout ${KERNELS_TIMEOUT:-420} python3 bench/kernels.py --json "$OUT/kernels.json" ${KERNEL_PARTS:+--parts $KERNEL_PARTS} \
               ${SWEEP_ONLY:+--sweep-only $SWEEP_ONLY} \
               2>&1 | tail -40 | tee "$OUT/kernels.txt" ;;
    profile) timeout ${PROFILE_TIMEOUT:-240} python3 bench/profile_step.py --train ${PROFILE_TRAIN:-4096} --out "$OUT/profile_step.txt" \
               2>&1 | tail -50 ;;
    ncu) timeout ${NCU_TIMEOUT:-180} ncu --clock-control none -k regex:_sparse_attn --launch-skip 1 --launch-count 1 \
           --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
           --section LaunchStats --section SchedulerStats python3 bench/ncu_case.py ${NCU_CASE:-csa_b64} > "$OUT/ncu.txt" 2>&1;
         grep -E "DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Registers Per|Shared Memory Config|Stall|Block Limit" "$OUT/ncu.txt" | head -30 ;;
    e2e) timeout ${E2E_TIMEOUT:-540} python3 bench/e2e.py --json "$OUT/e2e.json" ${E2E_ARGS:-} 2>&1 | tail -150 | tee "$OUT/e2e.txt" ;;
    long) timeout ${LONG_TIMEOUT:-400} python3 bench/e2e.py --json "$OUT/e2e_1m.json" --skip-peer --prefill 1048576 \
            --decode ${LONG_DECODE:-} --decode-b64 --decode-fp8 --train ${LONG_TRAIN:-} --train-checkpointed 2>&1 | tail -20 | tee "$OUT/e2e_1m.txt" ;;
    sweep) for i in $(seq ${SWEEP_FROM:-0} ${SWEEP_TO:-25}); do   # training attention configurations, one process each
             timeout ${SWEEP_EACH:-45} python3 bench/train_attn_sweep.py --pick $i 2>&1 | grep "_kernel"; done | tee "$OUT/sweep.txt" ;;
    targets) python3 bench/targets.py --e2e $(ls "$OUT"/e2e*.json) $( [ -f "$OUT/kernels.json" ] && echo --kernels "$OUT/kernels.json") \
               --out "$OUT/targets.md" --plot "$OUT/targets.png" ;;
  esac
  echo "=== $stage took $(( $(date +%s) - t0 )) s"
done
