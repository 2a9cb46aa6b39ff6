#!/usr/bin/env bash
# One device call: environment, GPU tests, then the requested benchmarks; results under $OUT, each file named
# <date>_<device>_<commit>_<what> (bench/provenance.py) so that it can go to bench/results/ as it is.
#   bash bench/gpu_session.sh tests ablations e2e kernels profile ncu sweep serve serve64 spec pipelined mtp fp4 \
#     swapsplit decode targets native cp
# serve64: the c=64 level alone with its step trace kept (gzipped); serve64n: the same, the model in the official
# formats served natively (DSV4_EXPERT_SWAP=1: on the swapped expert kernels); SERVE_TAG: a suffix for their files; mtp: bench/train_mtp.sh (train `small`, served
# MTP vs plain, acceptance per draft position; MTP_STEPS must be what MTP_MINUTES reaches); fp4: the FP4 GEMMs and
# grouped experts per kernel choice; swapsplit: the swapped expert kernels per K split and gate/up register cap
# (SWAPSPLIT_SETTINGS, bench/native_gemm.py --experts-swap); decode: bench/decode_kernels.py at 1 and 64 rows.
# cp: bench/cp_gpu.py (context parallelism) on every GPU nvidia-smi lists; its own <prefix>_cp_gpu.json/.txt.
# A copy of the tree without git metadata needs the commit given: DSV4_COMMIT=$(git rev-parse --short=7 HEAD).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export DSV4_RESULTS_DIR="$OUT"   # the bench scripts' default result folder
if [ -f /tmp/site/.dsv4_wheels ]; then   # installed by an earlier stage of this machine: reinstalling under a
  export PYTHONPATH=/tmp/site:$PWD        # process that imports from /tmp/site would pull files from under it
elif [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.dsv4_wheels && export PYTHONPATH=/tmp/site:$PWD || export PYTHONPATH=$PWD
else
  export PYTHONPATH=$PWD
fi
P="$OUT/$(python3 bench/provenance.py)"   # <date>_<device>_<commit>: the prefix of this call's files
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda)"; } | tee "${P}_env.txt"
for stage in "$@"; do
  echo "=== $stage"; t0=$(date +%s)
  case $stage in
    tests) timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -n 0 -v -rf --timeout ${TEST_TIMEOUT:-240} --durations 12 ${TESTS:-tests/gpu tests/ops} 2>&1 | tee "${P}_gpu_tests.txt" | tail -60 ;;
    ablations) rm -rf /tmp/abl; timeout ${ABL_TIMEOUT:-480} python3 bench/train_ablations.py --out /tmp/abl --steps ${ABL_STEPS:-120} --parallel ${ABL_PAR:-1} \
                 --batch-size 16 --seq-len 512 2>&1 | tail -30 | tee "${P}_ablations.txt"; cp /tmp/abl/compare.png "${P}_ablations.png" ;;
    kernels) timeout ${KERNELS_TIMEOUT:-420} python3 bench/kernels.py ${KERNEL_PARTS:+--parts $KERNEL_PARTS} \
               ${SWEEP_ONLY:+--sweep-only $SWEEP_ONLY} \
               2>&1 | tail -40 | tee "${P}_kernels.txt" ;;
    profile) timeout ${PROFILE_TIMEOUT:-240} python3 bench/profile_step.py --train ${PROFILE_TRAIN:-4096} 2>&1 | tail -50 ;;
    ncu) timeout ${NCU_TIMEOUT:-180} ncu --clock-control none -k regex:_sparse_attn --launch-skip 1 --launch-count 1 \
           --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
           --section LaunchStats --section SchedulerStats python3 bench/ncu_case.py ${NCU_CASE:-csa_b64} > "${P}_ncu_${NCU_CASE:-csa_b64}.txt" 2>&1;
         grep -E "DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Registers Per|Shared Memory Config|Stall|Block Limit" "${P}_ncu_${NCU_CASE:-csa_b64}.txt" | head -30 ;;
    e2e) timeout ${E2E_TIMEOUT:-540} python3 bench/e2e.py ${E2E_ARGS:-} 2>&1 | tail -150 | tee "${P}_e2e.txt" ;;
    native) timeout ${NATIVE_TIMEOUT:-290} python3 bench/native_model.py ${NATIVE_ARGS:-} 2>&1 | tail -220 | tee "${P}_native_model.txt" ;;
    long) timeout ${LONG_TIMEOUT:-400} python3 bench/e2e.py --json "${P}_e2e_1m.json" --skip-peer --prefill 1048576 \
            --decode ${LONG_DECODE:-} --decode-b64 --decode-fp8 --train ${LONG_TRAIN:-} --train-checkpointed 2>&1 | tail -20 | tee "${P}_e2e_1m.txt" ;;
    sweep) for i in $(seq ${SWEEP_FROM:-0} ${SWEEP_TO:-25}); do   # training attention configurations, one process each
             timeout ${SWEEP_EACH:-45} python3 bench/train_attn_sweep.py --pick $i 2>&1 | grep "_kernel"; done | tee "${P}_train_attn_sweep.txt" ;;
    serve) [ -f /tmp/flash4/config.json ] || python3 bench/serve.py --make-checkpoint /tmp/flash4 --preset flash4 \
             ${SERVE_MTP_LAYERS:+--mtp-layers $SERVE_MTP_LAYERS} 2>&1 | tail -3
           timeout ${SERVE_TIMEOUT:-560} python3 bench/serve.py --duration-limit ${SERVE_LEVEL_S:-60} \
             --launch "python3 -m dsv4 serve --checkpoint /tmp/flash4 --max-batch 64 --max-seq-len 33280 --trace ${P}_serve_trace.jsonl ${SERVE_FLAGS:-}" \
             ${SERVE_PEER:+--peer-launch "$SERVE_PEER"} ${SERVE_ARGS:-} 2>&1 | tail -60 | tee "${P}_serve.txt"
           python3 bench/engine_trace.py "${P}_serve_trace.jsonl" --slowest 12 > "${P}_serve_trace_summary.txt" 2>&1; tail -25 "${P}_serve_trace_summary.txt" ;;
    serve64|serve64n) # serve64n: the same model saved in the official formats, served natively (FP4 experts, FP8)
           if [ $stage = serve64n ]; then C=/tmp/flash4n; T=c64_native${SERVE_TAG:-}; F=--official; else C=/tmp/flash4; T=c64${SERVE_TAG:-}; F=; fi
           [ -f $C/config.json ] || python3 bench/serve.py --make-checkpoint $C --preset flash4 $F 2>&1 | tail -2
           timeout ${SERVE_TIMEOUT:-300} python3 bench/serve.py --duration-limit ${SERVE_LEVEL_S:-12} \
             --launch "python3 -m dsv4 serve --checkpoint $C --max-batch 64 --max-seq-len 33280 --trace ${P}_serve_${T}_trace.jsonl --step-token-budget 8256 --prefill-graphs 128 ${SERVE_FLAGS:-}" \
             --concurrency 64 --prompt-len 1024 --max-tokens 256 --prefix-len 0 --client-procs 8 --json ${P}_serve_$T.json 2>&1 | tail -8 | tee ${P}_serve_$T.txt
           python3 bench/engine_trace.py ${P}_serve_${T}_trace.jsonl --slowest 16 > ${P}_serve_${T}_trace_summary.txt 2>&1
           head -24 ${P}_serve_${T}_trace_summary.txt; gzip -f ${P}_serve_${T}_trace.jsonl ;;
    mtp) OUT=$OUT STEPS=${MTP_STEPS:-1300} MINUTES=${MTP_MINUTES:-4} SERVE_EXTRA="--num-draft ${MTP_DRAFTS:-3}" REQUESTS=4 \
           N_DRAFTS="${MTP_ACC_DRAFTS:-1 3}" ACC_PROMPTS=4 ACC_TOKENS=160 SERVE_TIMEOUT=140 ACC_TIMEOUT=${MTP_ACC_TIMEOUT:-120} \
           bash bench/train_mtp.sh 2>&1 | tail -40 ;;
    pipelined) timeout ${SPEC_TIMEOUT:-240} python3 bench/spec_step_count.py --device cuda --dtype bf16 --preset ${SPEC_PRESET:-small} \
            --time-steps 200 --acceptance ${SPEC_ACCEPTANCE:-0.76} --n-draft ${SPEC_DRAFTS:-3} --pipelined > "${P}_spec_step_pipelined.txt" 2>&1
         tail -30 "${P}_spec_step_pipelined.txt" ;;
    fp4) timeout ${FP4_TIMEOUT:-150} python3 bench/native_gemm.py --only fp4 --ms 1,2,4,16 --prefill-ms "" --moe-tokens "" --moe-per-expert "" \
           --fp4-decode old words --fp4-gemv 64 --out ${P}_native_gemm_fp4.json 2>&1 | tail -30 | tee ${P}_native_gemm_fp4.txt
         timeout ${FP4_TIMEOUT:-150} python3 bench/native_gemm.py --only moe --moe-tokens 1,2 --moe-per-expert 8,24,64 --moe-experts 32 \
           --fp4-decode old words --experts-gemv ${FP4_MOE_ARGS:---experts-swap} --out ${P}_native_gemm_moe.json 2>&1 | tail -30 | tee ${P}_native_gemm_moe.txt ;;
    swapsplit) timeout ${SWAPSPLIT_TIMEOUT:-300} python3 bench/native_gemm.py --only moe --moe-tokens "" --moe-per-expert 8,24,64 \
           --moe-experts 16 --experts-swap ${SWAPSPLIT_SETTINGS:-64:2:1 64:2:2 64:2:4 64:2:auto 64:2:1:168} \
           --out ${P}_native_gemm_swapsplit.json 2>&1 | tail -30 | tee ${P}_native_gemm_swapsplit.txt ;;
    decode) timeout ${DECODE_TIMEOUT:-120} python3 bench/decode_kernels.py --rows 1 64 --context 1024 --out ${P}_decode_kernels.txt 2>&1 | tail -30 ;;
    spec) timeout ${SPEC_TIMEOUT:-240} python3 bench/spec_step_count.py --device cuda --dtype bf16 --preset ${SPEC_PRESET:-small} \
            --time-steps 200 --acceptance ${SPEC_ACCEPTANCE:-0.76} --no-row > "${P}_spec_step_${SPEC_PRESET:-small}.txt" 2>&1; tail -40 "${P}_spec_step_${SPEC_PRESET:-small}.txt" ;;
    cp) timeout ${CP_TIMEOUT:-280} python3 bench/cp_gpu.py --nproc $(nvidia-smi -L | grep -c '^GPU') ${CP_ARGS:-} \
          2>&1 | tail -80 | tee "${P}_cp_gpu_log.txt" ;;
    targets) python3 bench/targets.py --e2e $(ls "${P}"_e2e*.json) $(ls "${P}"_kernels*.json 2>/dev/null | sed '1s/^/--kernels /') \
               --out "${P}_targets.md" --plot "${P}_targets.png" ;;
  esac
  echo "=== $stage took $(( $(date +%s) - t0 )) s"
done
