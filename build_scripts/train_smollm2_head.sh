#!/usr/bin/env bash
# Rebuild the draft head shipped for SmolLM2-135M-Instruct (redrafter_trt/heads/smollm2/).
#
# 1. base features by teacher forcing over the ShareGPT conversations and the writingbench
#    requests of the installed prompt packages (text the base reads, never committed), then
#    distillation of the base's next-token distribution into the head (forward KL, batch
#    vocabulary, float32, frozen base projection), for REDRAFTER_HEAD_TRAIN_MIN minutes;
# 2. the same head trained on, for REDRAFTER_HEAD_STAGE2_MIN minutes, over the base's own greedy
#    answers to requests it wrote itself (data/smollm2/answers.jsonl, in the repository: see
#    data/smollm2/README.md for how it was made) and the ShareGPT conversations;
# 3. the stage-2 head trained on, for REDRAFTER_HEAD_STAGE3_MIN minutes on two threads, over
#    those answers, the larger set of later base-written requests and answers in
#    data/smollm2/answers2/ (one file per chunk of 128 requests), and the ShareGPT conversations;
# 4. packaging: the projection the head shares with its base is dropped from the shipped file.
#
# Base features are computed by teacher forcing on the first use of each data file: 1-2 hours
# on a 2-core CPU for all of them (measured at 89-265 tokens/s, depending on load; cached under
# the user cache dir afterwards), plus the three training budgets. Knobs (environment):
# REDRAFTER_HEAD_TRAIN_MIN (17), REDRAFTER_HEAD_STAGE2_MIN (20), REDRAFTER_HEAD_STAGE3_MIN (30),
# REDRAFTER_HEAD_WORK (work dir, .head_work), REDRAFTER_HEAD_OUT (redrafter_trt/heads/smollm2).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash build_scripts/setup_env.sh
bin="${REDRAFTER_VENV:-$root/.venv}/bin"
work="${REDRAFTER_HEAD_WORK:-$root/.head_work}"
out="${REDRAFTER_HEAD_OUT:-$root/redrafter_trt/heads/smollm2}"
minutes="${REDRAFTER_HEAD_TRAIN_MIN:-17}"
minutes2="${REDRAFTER_HEAD_STAGE2_MIN:-20}"
minutes3="${REDRAFTER_HEAD_STAGE3_MIN:-30}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mkdir -p "$work"
"$bin/redrafter-train" train --model_dir smollm2 --data sharegpt writingbench \
  --output_dir "$work/head" --exit_dim 576 --lm_head_init base --freeze_lm_head \
  --num_draft_layers 1 --draft_len 4 --loss kl --kl_vocab batch --precision fp32 --lr 2e-3 \
  --max_steps 1000000 --time_budget_min "$minutes" --checkpoint_dir "$work/checkpoints" \
  --threads 1 --no_progress --overwrite
"$bin/redrafter-train" train --model_dir smollm2 --data data/smollm2/answers.jsonl sharegpt \
  --init_from "$work/head" --output_dir "$work/head2" --freeze_lm_head --loss kl --kl_vocab batch \
  --precision fp32 --lr 1e-3 --max_steps 1000000 --time_budget_min "$minutes2" \
  --checkpoint_dir "$work/checkpoints2" --threads 1 --no_progress --overwrite
"$bin/redrafter-train" train --model_dir smollm2 \
  --data data/smollm2/answers.jsonl data/smollm2/answers2 sharegpt \
  --init_from "$work/head2" --output_dir "$work/head3" --freeze_lm_head --loss kl --kl_vocab batch \
  --precision fp32 --lr 1e-3 --max_steps 1000000 --time_budget_min "$minutes3" \
  --checkpoint_dir "$work/checkpoints3" --threads 2 --no_progress --overwrite
"$bin/python" -m redrafter_trt.heads.package --head "$work/head3" --model_dir smollm2 \
  --output "$out" --overwrite
