#!/usr/bin/env bash
# Train a ReDrafter draft head for a Hugging Face base model by self-distillation, measure it,
# and convert base + head into a checkpoint ready for redrafter-build:
#   1. redrafter-train gen-data: the base's own greedy answers to a prompt set (training data);
#   2. redrafter-train train:    the head learns the base's next-token distributions (forward KL);
#   3. redrafter-train eval:     tokens per step of base + head on held-out prompts, with a check
#                                that greedy speculative output equals plain output;
#   4. redrafter-convert:        base + the trained head -> WORK_DIR/ckpt.
#
#   bash examples/train_head.sh MODEL_DIR WORK_DIR [options]
#
#   MODEL_DIR            Hugging Face Llama-family or Qwen2 directory (with its tokenizer), or
#                        `smollm2` for the built-in SmolLM2-135M-Instruct
#   WORK_DIR             where data.jsonl, head/, eval.json and ckpt/ are written
#   --prompts SRC        training prompts: sharegpt, writingbench, or a JSON/JSONL prompt file
#                        (default: sharegpt, the 500 built-in conversations' first turns)
#   --limit N            first N training prompts (default: 200)
#   --answer_tokens N    tokens the base writes per prompt, for the data and in the eval step
#                        (default: 128)
#   --eval_prompts SRC   held-out prompts for the eval step (default: mt-bench)
#   --eval_limit N       first N eval prompts (default: 16)
#   --max_steps N        optimizer steps; default: as many as --minutes allows
#   --minutes M          training time budget when --max_steps is not given (default: 10)
#   --batch_size N       positions per optimizer step (default: 256)
#   --beams W            beams of the eval step and the checkpoint (default: 4)
#   --draft_len D        draft steps trained, measured and written (the engine's D; default: 4)
#
# Then: bash examples/llama_end_to_end.sh MODEL_DIR OTHER_DIR --drafter WORK_DIR/head (or
# redrafter-build --checkpoint_dir WORK_DIR/ckpt ...). Exit status: 0 when every step ran; 1 when
# one failed; 2 for a bad argument.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "train_head.sh: $*" >&2; exit 2; }
if [ $# -ge 1 ] && { [ "$1" = "-h" ] || [ "$1" = "--help" ]; }; then usage; exit 0; fi
[ $# -ge 2 ] || die "expected MODEL_DIR WORK_DIR [options] (--help explains them)"
model="$1" work="$2"; shift 2
prompts=sharegpt limit=200 answer_tokens=128 eval_prompts=mt-bench eval_limit=16
max_steps="" minutes=10 batch_size=256 beams=4 draft_len=4
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || die "$1 needs a value (--help explains the options)"
  case "$1" in
    --prompts) prompts="$2" ;;
    --limit) limit="$2" ;;
    --answer_tokens) answer_tokens="$2" ;;
    --eval_prompts) eval_prompts="$2" ;;
    --eval_limit) eval_limit="$2" ;;
    --max_steps) max_steps="$2" ;;
    --minutes) minutes="$2" ;;
    --batch_size) batch_size="$2" ;;
    --beams) beams="$2" ;;
    --draft_len) draft_len="$2" ;;
    *) die "unknown option $1 (--help explains the options)" ;;
  esac
  shift 2
done
for v in limit answer_tokens eval_limit batch_size beams draft_len ${max_steps:+max_steps}; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "--$v must be a positive integer, got '${!v}'"
done
[[ "$minutes" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--minutes must be a number, got '$minutes'"
if [ "$model" != smollm2 ] && [ ! -f "$model/config.json" ]; then
  die "MODEL_DIR $model: no config.json (expected a Hugging Face model directory or 'smollm2')"
fi
mkdir -p "$work"
step() { echo "== $*" >&2; }

# 1. Self-distillation data: the base answers the prompts greedily (resumes if interrupted).
step "redrafter-train gen-data: $limit prompts of $prompts, $answer_tokens tokens each"
redrafter-train gen-data --model_dir "$model" --prompts "$prompts" --limit "$limit" \
  --max_new_tokens "$answer_tokens" --output "$work/data.jsonl" --overwrite --no_progress

# 2. Train the head (base frozen; its features are cached in WORK_DIR/cache).
length=(--time_budget_min "$minutes")
if [ -n "$max_steps" ]; then length=(--max_steps "$max_steps" --warmup_steps $(( (max_steps + 9) / 10 ))); fi
step "redrafter-train train -> $work/head (D=$draft_len, ${length[*]})"
redrafter-train train --model_dir "$model" --data "$work/data.jsonl" --output_dir "$work/head" \
  --draft_len "$draft_len" --batch_size "$batch_size" "${length[@]}" --cache_dir "$work/cache" \
  --overwrite --no_progress

# 3. Tokens per step on held-out prompts, and greedy equality with plain decoding.
step "redrafter-train eval on $eval_prompts ($eval_limit prompts, W=$beams, D=$draft_len)"
redrafter-train eval --model_dir "$model" --drafter_model_dir "$work/head" --prompts "$eval_prompts" \
  --limit "$eval_limit" --max_new_tokens "$answer_tokens" --redrafter_num_beams "$beams" --redrafter_draft_len_per_beam "$draft_len" \
  --plain_check --output "$work/eval.json" --no_progress

# 4. Base + trained head -> checkpoint.
step "redrafter-convert -> $work/ckpt"
redrafter-convert --model_dir "$model" --drafter_model_dir "$work/head" --output_dir "$work/ckpt" \
  --redrafter_num_beams "$beams" --redrafter_draft_len_per_beam "$draft_len" --overwrite
step "done: head in $work/head (training_report.json), tokens per step in $work/eval.json"
