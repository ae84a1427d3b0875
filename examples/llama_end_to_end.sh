#!/usr/bin/env bash
# A Llama-family Hugging Face model end to end with the command-line tools:
#   redrafter-convert (base + draft head -> checkpoint) -> redrafter-build (torch engine)
#   -> redrafter-run (the same chat prompt with and without speculation; greedy text must match)
#   -> redrafter-bench (speculative against plain decoding on a prompt set).
# MODEL_DIR is any LlamaForCausalLM directory (SmolLM2 is one; `smollm2` names the built-in copy).
#
#   bash examples/llama_end_to_end.sh MODEL_DIR WORK_DIR [options]
#
#   MODEL_DIR            Hugging Face directory (config.json, *.safetensors, tokenizer files), or
#                        `smollm2` for the built-in SmolLM2-135M-Instruct
#   WORK_DIR             where ckpt/, engine/, run_*.json and bench/ are written (reruns replace them)
#   --drafter DIR        draft head directory (config.json + model.safetensors), e.g. from
#                        examples/train_head.sh. Default: the shipped head for `smollm2`, else a
#                        random head (plumbing only: almost no draft token is accepted; the output
#                        is exact either way)
#   --beams W            beams drafted per step (default: 4)
#   --draft_len D        draft tokens per beam (default: 4)
#   --dtype T            checkpoint dtype: auto, float32, float16 or bfloat16 (default: auto)
#   --max_seq_len N      engine's prompt + output limit; prompts up to N/2 tokens (default: 1024)
#   --prompt TEXT        the chat prompt of the run step (default: a short question)
#   --max_new_tokens N   new tokens per prompt in the run and bench steps (default: 64)
#   --bench_dataset SRC  redrafter-bench --dataset: mt-bench, writingbench, sharegpt, or a
#                        .json/.jsonl prompt file (default: mt-bench)
#   --bench_prompts N    prompts benchmarked (default: 8)
#   --bench_repetitions N  timed repetitions per method (default: 3)
#
# Exit status: 0 when every step ran and greedy speculative output equals plain output; 1 when a
# step failed or the outputs differ; 2 for a bad argument.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "llama_end_to_end.sh: $*" >&2; exit 2; }
if [ $# -ge 1 ] && { [ "$1" = "-h" ] || [ "$1" = "--help" ]; }; then usage; exit 0; fi
[ $# -ge 2 ] || die "expected MODEL_DIR WORK_DIR [options] (--help explains them)"
model="$1" work="$2"; shift 2
drafter="" beams=4 draft_len=4 dtype=auto max_seq_len=1024 max_new_tokens=64
prompt="What does a recurrent draft head do in speculative decoding?"
bench_dataset=mt-bench bench_prompts=8 bench_repetitions=3
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || die "$1 needs a value (--help explains the options)"
  case "$1" in
    --drafter) drafter="$2" ;;
    --beams) beams="$2" ;;
    --draft_len) draft_len="$2" ;;
    --dtype) dtype="$2" ;;
    --max_seq_len) max_seq_len="$2" ;;
    --prompt) prompt="$2" ;;
    --max_new_tokens) max_new_tokens="$2" ;;
    --bench_dataset) bench_dataset="$2" ;;
    --bench_prompts) bench_prompts="$2" ;;
    --bench_repetitions) bench_repetitions="$2" ;;
    *) die "unknown option $1 (--help explains the options)" ;;
  esac
  shift 2
done
for v in beams draft_len max_seq_len max_new_tokens bench_prompts bench_repetitions; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "--$v must be a positive integer, got '${!v}'"
done
if [ "$model" != smollm2 ] && [ ! -f "$model/config.json" ]; then
  die "MODEL_DIR $model: no config.json (expected a Hugging Face model directory or 'smollm2')"
fi
mkdir -p "$work"
step() { echo "== $*" >&2; }

# 1. Base + head -> checkpoint (config.json + rank0.safetensors + the tokenizer files).
head_args=(--random_drafter)
if [ -n "$drafter" ]; then head_args=(--drafter_model_dir "$drafter"); elif [ "$model" = smollm2 ]; then head_args=(); fi
step "redrafter-convert $model -> $work/ckpt (W=$beams, D=$draft_len)"
redrafter-convert --model_dir "$model" "${head_args[@]}" --output_dir "$work/ckpt" --dtype "$dtype" \
  --redrafter_num_beams "$beams" --redrafter_draft_len_per_beam "$draft_len" --overwrite

# 2. Checkpoint -> torch engine (runs on CPU or a GPU; --backend trtllm needs TensorRT-LLM).
step "redrafter-build $work/ckpt -> $work/engine"
redrafter-build --checkpoint_dir "$work/ckpt" --output_dir "$work/engine" --backend torch \
  --max_batch_size 4 --max_input_len $((max_seq_len / 2)) --max_seq_len "$max_seq_len" --overwrite

# 3. The same chat prompt, speculative and plain (the baseline), greedy: the text must match.
for mode in spec plain; do
  extra=(); [ $mode = plain ] && extra=(--no_speculation)
  step "redrafter-run ($mode): $prompt"
  redrafter-run --engine_dir "$work/engine" --use_chat_template --input_text "$prompt" \
    --max_output_len "$max_new_tokens" --json --no_progress "${extra[@]}" > "$work/run_$mode.json"
done
"${PYTHON:-python3}" - "$work/run_spec.json" "$work/run_plain.json" <<'EOF'
import json, sys
spec, plain = (json.load(open(p)) for p in sys.argv[1:])
print(f"text: {spec['outputs'][0]['output_text']!r}")
for name, r in (("speculative", spec), ("plain", plain)):
    print(f"{name:>12}: {r['generated_tokens']} tokens in {r['num_steps']} steps "
          f"({r['tokens_per_step']:.2f} tokens/step), {r['wall_s']:.2f} s")
same = spec["outputs"][0]["output_token_ids"] == plain["outputs"][0]["output_token_ids"]
print("greedy speculative output equals plain output:", same)
sys.exit(0 if same else 1)
EOF

# 4. Benchmark: plain vs speculative on the same prompts (bench.json, bench.md); --strict fails
#    on any greedy mismatch.
step "redrafter-bench on $bench_dataset ($bench_prompts prompts) -> $work/bench"
redrafter-bench --engine_dir "$work/engine" --dataset "$bench_dataset" --num_prompts "$bench_prompts" \
  --max_new_tokens "$max_new_tokens" --repetitions "$bench_repetitions" --output_dir "$work/bench" --no_plot --strict
step "done: engine in $work/engine, benchmark in $work/bench/bench.md"
