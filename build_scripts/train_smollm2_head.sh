#!/usr/bin/env bash
# Rebuild the draft head shipped for SmolLM2-135M-Instruct (redrafter_trt/heads/smollm2/).
#
# The data is in the repository (data/smollm2/README.md): the base's greedy answers to requests
# it wrote itself (answers.jsonl, answers2/) and to human-written requests of installed prompt
# packages (human/, prompts by reference, rebuilt from the packages that setup_env.sh installs)
# and to requests written for this data by a large language model (requests_written*.jsonl,
# written/), plus the ShareGPT conversations of an installed package.
#
# 1. base features by teacher forcing on the first use of each data file (cached under the user
#    cache dir), then distillation of the base's next-token distribution into a head with
#    exit_dim = H, one residual block, the RNN, and a vocabulary projection of its own over
#    REDRAFTER_HEAD_K draft ids (the EOS ids and the tokens the base wrote most often in the
#    data), started from the base's rows of those ids; forward KL over the batch vocabulary,
#    float32, two threads, REDRAFTER_HEAD_STAGE1_MIN minutes, over everything but WritingBench;
# 2. the stage-1 head trained on, for REDRAFTER_HEAD_STAGE2_MIN minutes, over the same data plus
#    the answers to WritingBench's requests (long prompts: their base features are the costliest);
# 3. the stage-2 head trained on, for REDRAFTER_HEAD_STAGE3_MIN minutes, over everything above
#    plus the answers to HealthBench's requests and the base's answers sampled at temperature 0.7
#    to the training requests once more (data/smollm2/sampled: more contexts of the base's text);
# 4. the stage-3 head, stored in float16, widened to REDRAFTER_HEAD_K4 draft ids (its own ids and
#    trained rows kept, a new id started from the base's row as it is: --new_rows base, as the
#    shipped head was made) and trained on, for
#    REDRAFTER_HEAD_STAGE4_MIN minutes, over everything above plus two more seeds of sampled
#    answers (702, 703), with base features computed by a bfloat16 copy of the base;
# 5. the stage-4 head trained on, for REDRAFTER_HEAD_STAGE5_MIN minutes at half the learning
#    rate, over the same data;
# 6. the stage-5 head, stored in float16, grown to REDRAFTER_HEAD_BLOCKS6 residual blocks (the new
#    blocks start as the identity: the grown head drafts as before until trained) and trained on,
#    for REDRAFTER_HEAD_STAGE6_MIN minutes, over the same data;
# 7. the stage-6 head trained on, for REDRAFTER_HEAD_STAGE7_MIN minutes at half the learning rate;
# 8. the stage-7 head trained on, for REDRAFTER_HEAD_STAGE8_MIN minutes at that rate, over
#    everything above plus the greedy answers to PersistBench's and FreshQA's requests;
# 9. the stage-8 head trained on, for REDRAFTER_HEAD_STAGE9_MIN minutes at that rate, over
#    everything above plus answers to the same requests sampled at temperature 0.7 (seed 704);
# 10. the stage-9 head trained on, for REDRAFTER_HEAD_STAGE10_MIN minutes at that rate, over
#    everything above plus the greedy and sampled (seed 705) answers to the 959 requests of
#    data/smollm2/requests_written.jsonl (written for this data by a large language model);
# 11. the stage-10 head trained on, for REDRAFTER_HEAD_STAGE11_MIN minutes at that rate, over
#    everything above plus the same two kinds of answers to the 960 requests of
#    requests_written2.jsonl;
# 12. packaging: the whole head (its own projection included) stored in float16.
#
# On the 2-vCPU EPYC VM with 512-bit FMAs of 2026-12-06: base features at 900-1,050 tokens/s on two
# threads (1,073,000 tokens without WritingBench, about 14 minutes the first time; stage 3's new
# data adds 1.5 million, about 28 minutes), plus the eleven training budgets. On a 2-vCPU Zen 4
# EPYC VM: 440-520 tokens/s (docs/results.md, 2026-12-07); stage 4's bfloat16 features of all
# 3.68 million tokens there took 85 minutes (725 tokens/s), stages 8-9's new text 0.4 million
# tokens in 8 minutes, stage 10's 0.46 million in 9 minutes (840 tokens/s), stage 11's 0.49
# million in 11 minutes.
# Knobs (environment): REDRAFTER_HEAD_K (4096), REDRAFTER_HEAD_K4 (8192),
# REDRAFTER_HEAD_STAGE1_MIN (6), REDRAFTER_HEAD_STAGE2_MIN (18), REDRAFTER_HEAD_STAGE3_MIN (10),
# REDRAFTER_HEAD_STAGE4_MIN (15), REDRAFTER_HEAD_STAGE5_MIN (15), REDRAFTER_HEAD_BLOCKS6 (3),
# REDRAFTER_HEAD_STAGE6_MIN (20), REDRAFTER_HEAD_STAGE7_MIN (15), REDRAFTER_HEAD_STAGE8_MIN (15),
# REDRAFTER_HEAD_STAGE9_MIN (15), REDRAFTER_HEAD_STAGE10_MIN (15), REDRAFTER_HEAD_STAGE11_MIN
# (15), REDRAFTER_HEAD_WORK (work dir, .head_work),
# REDRAFTER_HEAD_OUT (redrafter_trt/heads/smollm2).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# REDRAFTER_HEAD_DRY_RUN=1 prints the commands instead of running them (nothing is installed,
# read or written); tests/test_shipped_head.py checks them against the CLI and the data.
dry="${REDRAFTER_HEAD_DRY_RUN:-}"
[[ -n "$dry" ]] || bash build_scripts/setup_env.sh
bin="${REDRAFTER_VENV:-$root/.venv}/bin"
work="${REDRAFTER_HEAD_WORK:-$root/.head_work}"
out="${REDRAFTER_HEAD_OUT:-$root/redrafter_trt/heads/smollm2}"
k="${REDRAFTER_HEAD_K:-4096}"
minutes1="${REDRAFTER_HEAD_STAGE1_MIN:-6}"
minutes2="${REDRAFTER_HEAD_STAGE2_MIN:-18}"
minutes3="${REDRAFTER_HEAD_STAGE3_MIN:-10}"
k4="${REDRAFTER_HEAD_K4:-8192}"
minutes4="${REDRAFTER_HEAD_STAGE4_MIN:-15}"
minutes5="${REDRAFTER_HEAD_STAGE5_MIN:-15}"
blocks6="${REDRAFTER_HEAD_BLOCKS6:-3}"
minutes6="${REDRAFTER_HEAD_STAGE6_MIN:-20}"
minutes7="${REDRAFTER_HEAD_STAGE7_MIN:-15}"
minutes8="${REDRAFTER_HEAD_STAGE8_MIN:-15}"
minutes9="${REDRAFTER_HEAD_STAGE9_MIN:-15}"
minutes10="${REDRAFTER_HEAD_STAGE10_MIN:-15}"
minutes11="${REDRAFTER_HEAD_STAGE11_MIN:-15}"
run() {
  if [[ -n "$dry" ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}
d=data/smollm2
data=("$d/answers.jsonl" "$d/answers2" "$d/human/arena-hard.jsonl" "$d/human/ifeval.jsonl"
  "$d/human/ifbench.jsonl" "$d/human/helm-prompts.jsonl" "$d/human/longbench-write.jsonl" sharegpt)
# stage N MINUTES LR [flags]: train head N over the data listed so far, writing $work/headN
stage() {
  local n=$1 minutes=$2 lr=$3
  shift 3
  run "$bin/redrafter-train" train --model_dir smollm2 --draft_len 4 --loss kl --kl_vocab batch \
    --precision fp32 --max_steps 1000000 --threads 2 --no_progress --overwrite \
    --data "${data[@]}" --output_dir "$work/head$n" --lr "$lr" --time_budget_min "$minutes" \
    --checkpoint_dir "$work/checkpoints$n" "$@"
}
# float16 HEAD [OUT]: $work/HEAD stored in float16 (its own projection included), in OUT
# (default: $work/HEAD-float16)
float16() {
  run "$bin/python" -m redrafter_trt.heads.package --head "$work/$1" --model_dir smollm2 \
    --output "${2:-$work/$1-float16}" --own_projection --dtype float16 --overwrite
}
[[ -n "$dry" ]] || mkdir -p "$work"
stage 1 "$minutes1" 2e-3 --exit_dim 576 --num_draft_layers 1 --lm_head_init base \
  --draft_vocab_size "$k"
data+=("$d/human/writingbench.jsonl")
stage 2 "$minutes2" 1e-3 --init_from "$work/head1"
data+=("$d/human/healthbench.jsonl" "$d/sampled/seed700" "$d/sampled/seed701")
stage 3 "$minutes3" 1e-3 --init_from "$work/head2"
float16 head3
data+=("$d/sampled/seed702" "$d/sampled/seed703")
stage 4 "$minutes4" 1e-3 --base_dtype bfloat16 --init_from "$work/head3-float16" \
  --draft_vocab_size "$k4" --new_rows base
stage 5 "$minutes5" 5e-4 --base_dtype bfloat16 --init_from "$work/head4"
float16 head5
stage 6 "$minutes6" 1e-3 --base_dtype bfloat16 --init_from "$work/head5-float16" \
  --num_draft_layers "$blocks6"
stage 7 "$minutes7" 5e-4 --base_dtype bfloat16 --init_from "$work/head6"
data+=("$d/human/persistbench.jsonl" "$d/human/freshqa.jsonl")
stage 8 "$minutes8" 5e-4 --base_dtype bfloat16 --init_from "$work/head7"
data+=("$d/sampled/seed704")
stage 9 "$minutes9" 5e-4 --base_dtype bfloat16 --init_from "$work/head8"
data+=("$d/written/greedy.jsonl.gz" "$d/sampled/seed705/written.jsonl.gz")
stage 10 "$minutes10" 5e-4 --base_dtype bfloat16 --init_from "$work/head9"
data+=("$d/written/greedy2.jsonl.gz" "$d/sampled/seed705/written2.jsonl.gz")
stage 11 "$minutes11" 5e-4 --base_dtype bfloat16 --init_from "$work/head10"
float16 head11 "$out"
