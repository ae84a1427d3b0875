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
# 3. packaging: the projection the head shares with its base is dropped from the shipped file.
#
# One thread: 50-80 min of base features on a 2-core CPU (measured; cached under the user cache
# dir afterwards) plus the two training budgets. Knobs (environment): REDRAFTER_HEAD_TRAIN_MIN
# (17), REDRAFTER_HEAD_STAGE2_MIN (20), REDRAFTER_HEAD_WORK (work dir, .head_work),
# REDRAFTER_HEAD_OUT (redrafter_trt/heads/smollm2).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash build_scripts/setup_env.sh
bin="${REDRAFTER_VENV:-$root/.venv}/bin"
work="${REDRAFTER_HEAD_WORK:-$root/.head_work}"
out="${REDRAFTER_HEAD_OUT:-$root/redrafter_trt/heads/smollm2}"
minutes="${REDRAFTER_HEAD_TRAIN_MIN:-17}"
minutes2="${REDRAFTER_HEAD_STAGE2_MIN:-20}"
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
"$bin/python" -m redrafter_trt.heads.package --head "$work/head2" --model_dir smollm2 \
  --output "$out" --overwrite
