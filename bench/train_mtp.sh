#!/usr/bin/env bash
# One device call: train the `small` preset with `dsv4 train` (its MTP head trains with it), then measure MTP
# speculative decoding against plain decoding on that checkpoint with bench/serve.py --mtp-compare, and the
# acceptance per draft position for n_draft 1..4 with bench/mtp_acceptance.py. The checkpoint is too large to bring
# back, so all happen in one call; results land under $OUT (metrics, serve JSON, acceptance table).
#   STEPS=1800 MINUTES=5 bash bench/train_mtp.sh
#   STEPS=550 MINUTES=3 SERVE=0 bash bench/train_mtp.sh     # acceptance per draft position only, no server
#   N_DRAFTS="1 3" ...                                       # the draft counts the acceptance run tries
# STEPS must be what MINUTES reaches (~0.17-0.25 s a step on an H100/H200): the attention stages take fractions of
# STEPS, and a run the time limit stops in a warm-up stage never trains the sparse attention its inference runs.
# (a device call has 10 minutes: training, the server comparison, up to SERVE_TIMEOUT, and the acceptance run,
# up to ACC_TIMEOUT, must fit in them)
# CORPUS_BYTES (default 40 MB: the whole standard library, ~32 MB): at 20 MB a 900-step run (H100, 4 min) saw its
# corpus ~2.4 times and overfitted (training loss 0.34, validation 2.31 at step 600 rising to 2.40 at 900).
# Prompts are windows of a Python file outside the training corpus (the corpus is the standard library's
# sources; installed packages are excluded from it): in-distribution text the model has not seen.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
P="$OUT/$(python3 bench/provenance.py)"
RUN=${RUN:-/tmp/runs/small}
python3 -m dsv4 train --preset ${PRESET:-small} --out "$RUN" --overwrite --steps ${STEPS:-1800} --time-limit ${MINUTES:-5} \
  --lr ${LR:-1e-3} --batch-size 32 --seq-len 512 --max-corpus-bytes ${CORPUS_BYTES:-40000000} \
  --eval-interval 200 --save-interval 100000 --log-interval 50 2>&1 | tail -15
cp "$RUN/metrics.jsonl" "${P}_train_small_metrics.jsonl"; cp "$RUN/loss.png" "${P}_train_small_loss.png" 2>/dev/null
TEXT=$(python3 -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'nn/modules/module.py'))")
[ "${SERVE:-1}" = 0 ] || timeout ${SERVE_TIMEOUT:-240} python3 bench/serve.py --mtp-compare --mtp-only --prompt-text "$TEXT" --tokenizer "$RUN/final" \
  --launch "python3 -m dsv4 serve --checkpoint $RUN/final --max-batch 8 --max-seq-len 4096 ${SERVE_EXTRA:-}" \
  --concurrency 1 --prompt-len ${PROMPT_LEN:-512} --max-tokens ${MAX_TOKENS:-256} --prefix-len 0 \
  --requests-per-level ${REQUESTS:-6} --duration-limit 40 --json "${P}_serve_mtp_small.json" 2>&1 | tail -25
timeout ${ACC_TIMEOUT:-180} python3 bench/mtp_acceptance.py --checkpoint "$RUN/final" --text "$TEXT" --n-draft ${N_DRAFTS:-1 2 3 4} \
  --prompts ${ACC_PROMPTS:-6} --prompt-len ${PROMPT_LEN:-512} --max-new ${ACC_TOKENS:-192} \
  --out "${P}_mtp_acceptance_small.txt" 2>&1 | tail -40
