#!/usr/bin/env bash
# The main job end to end on the built-in default: SmolLM2-135M-Instruct on the CPU backend,
# with the draft head shipped for it (redrafter_trt/heads/smollm2):
# convert (base + shipped head) -> build (torch engine) -> run (speculative and plain, compared).
#
# `demo.sh --train` instead first trains a small head of its own (self-distillation, a few
# minutes, cached under the user cache dir keyed by its settings) and runs that. Knobs
# (environment): REDRAFTER_DEMO_DIR (work dir, .demo); with --train: REDRAFTER_DEMO_PROMPTS
# (prompts per source the base answers, 32), REDRAFTER_DEMO_NEW_TOKENS (tokens per answer, 128),
# REDRAFTER_DEMO_TRAIN_MIN (training minutes, 2).
set -euo pipefail

# The key of the engine built from draft head directory $1: its files' content and the
# convert/build settings below. `demo.sh --engine-key HEAD_DIR` prints it (and does nothing else).
convert_args=(--redrafter_num_beams 4 --redrafter_draft_len_per_beam 4)
build_args=(--backend torch --max_batch_size 4 --max_seq_len 1024 --max_input_len 512)
engine_key() {
  { printf '%s\n' v2 "${convert_args[*]}" "${build_args[*]}"
    sha256sum < "$1/config.json"; sha256sum < "$1/model.safetensors"; } | sha256sum | cut -c1-16
}
if [ "${1:-}" = "--engine-key" ]; then
  engine_key "${2:?usage: demo.sh --engine-key HEAD_DIR}"
  exit 0
fi
train=0
case "${1:-}" in
  "") ;;
  --train) train=1 ;;
  -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "demo.sh: unknown argument '$1' (expected --train, --engine-key HEAD_DIR or --help)" >&2; exit 2 ;;
esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash build_scripts/setup_env.sh
bin="${REDRAFTER_VENV:-$root/.venv}/bin"
work="${REDRAFTER_DEMO_DIR:-$root/.demo}"
cache="${REDRAFTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/redrafter_trt}"
n_prompts="${REDRAFTER_DEMO_PROMPTS:-32}"
new_tokens="${REDRAFTER_DEMO_NEW_TOKENS:-128}"
train_min="${REDRAFTER_DEMO_TRAIN_MIN:-2}"
mkdir -p "$work"

head="$root/redrafter_trt/heads/smollm2"
head_args=()  # the shipped head: redrafter-convert --model_dir smollm2 picks it by default
if [ "$train" = 1 ]; then
  # 1. Self-distillation data: the base model answers ShareGPT prompts (cached and resumable).
  gen_args=(--model_dir smollm2 --prompts sharegpt writingbench --limit "$n_prompts" --max_new_tokens "$new_tokens"
            --batch_size 16)
  # 2. A small head: exit_dim 256 (input_proj from 2H = 1152), one residual block, D = 4.
  train_args=(--exit_dim 256 --num_draft_layers 1 --draft_len 4 --loss kl --teacher_topk 32
              --lr 2e-3 --warmup_steps 20 --epochs 100 --time_budget_min "$train_min" --batch_size 64
              --eval_fraction 0.1 --seed 0)
  key="$(printf '%s\n' v1 "${gen_args[*]}" "${train_args[*]}" | sha256sum | cut -c1-16)"
  head="$cache/demo_heads/smollm2-$key"
  if [ ! -f "$head/model.safetensors" ]; then
    echo "== training a draft head for SmolLM2-135M-Instruct (cached at $head) =="
    data="$("$bin/redrafter-train" gen-data "${gen_args[@]}")"
    "$bin/redrafter-train" train --model_dir smollm2 --data "$data" --output_dir "$head" \
      "${train_args[@]}" --overwrite
  fi
  head_args=(--drafter_model_dir "$head")
fi

# 3. Convert and build, redone only when the head's content (or these settings) changed: the key
#    hashes the head's files, so a head trained elsewhere (another REDRAFTER_CACHE) is never run
#    through an engine built from an older one.
engine_key="$(engine_key "$head")"
if [ "$(cat "$work/drafter_key" 2>/dev/null)" != "$engine_key" ] || [ ! -f "$work/engine/config.json" ]; then
  "$bin/redrafter-convert" --model_dir smollm2 "${head_args[@]}" --output_dir "$work/ckpt" \
    "${convert_args[@]}" --overwrite
  "$bin/redrafter-build" --checkpoint_dir "$work/ckpt" --output_dir "$work/engine" \
    "${build_args[@]}" --overwrite
  echo "$engine_key" > "$work/drafter_key"
fi

# 4. Speculative vs plain decoding through the same engine.
prompts=("What is the capital of France?" "Write a haiku about the sea."
         "Give three tips for staying focused while studying.")
echo "== speculative (greedy) =="
"$bin/redrafter-run" --engine_dir "$work/engine" --use_chat_template --max_output_len 96 \
  --input_text "${prompts[@]}" --json > "$work/spec.json"
echo "== plain decoding (greedy) =="
"$bin/redrafter-run" --engine_dir "$work/engine" --use_chat_template --max_output_len 96 \
  --input_text "${prompts[@]}" --json --no_speculation > "$work/plain.json"
"$bin/python" - "$work/spec.json" "$work/plain.json" "$head/training_report.json" <<'PY'
import json, sys
spec, plain, report = (json.load(open(p)) for p in sys.argv[1:4])
ev = report.get("eval") or {}
if ev:
    acc = "/".join(f"{a:.2f}" for a in ev["top1_accuracy_per_depth"])
    print(f"draft head (training report, {report['steps']} steps, "
          f"{report['train_seconds_total']:.0f} s of training): held-out top-1 agreement per "
          f"depth {acc}; its estimate of tokens per step for one greedy chain (1 beam) over the "
          f"held-out data: {ev['greedy_chain_tokens_per_step']:.2f}")
for i, (s, p) in enumerate(zip(spec["outputs"], plain["outputs"])):
    print(f"[{i}] {s['output_text']!r}")
    print(f"    tokens per step: {s['accepted_per_step'][1:]}")
    print(f"    identical to plain decoding: {s['output_token_ids'] == p['output_token_ids']}")
if spec.get("policy") == "adaptive":
    shapes = ", ".join(f"{c['shape']}{' (plain)' if c['shape'].endswith('x0') else ''}: "
                       f"{c['steps']} steps" for c in spec.get("chosen_shapes") or [])
    print(f"adaptive speculation ({spec.get('policy_note')}) chose beams x depth per step: {shapes}")
    why = spec.get("policy_why")
    if why:
        print(f"  why: at batch {why['batch']} the best speculative shape, {why['best_speculative']}, "
              f"is predicted at {why['predicted_speedup']:.2f}x plain decoding (it drafts above "
              f"{why['speculates_above']:.2f}x), with the head's estimated acceptance "
              f"P(>= j) = {why['estimated_acceptance']} and this machine's measured step costs")
else:
    print(f"speculation policy: {spec.get('policy')}")
print(f"measured on these prompts: speculative {spec['tokens_per_step']:.2f} tokens/step "
      f"({spec['num_steps']} steps, {spec['wall_s']:.2f} s); plain {plain['tokens_per_step']:.2f} "
      f"tokens/step ({plain['num_steps']} steps, {plain['wall_s']:.2f} s)")
ratio = plain["wall_s"] / spec["wall_s"] if spec["wall_s"] > 0 else float("inf")
if ratio >= 1:
    print(f"On this machine speculation was {ratio:.2f}x as fast as plain decoding: "
          f"{spec['tokens_per_step']:.2f} tokens per step paid for the drafting and the larger "
          "verifying forward.")
else:
    print(f"On this machine speculation took {1 / ratio:.2f}x as long as plain decoding: "
          f"drafting and verifying the tree cost more per step than the "
          f"{spec['tokens_per_step']:.2f} tokens per step save. On a CPU a forward's cost grows "
          "with the tokens it verifies; the speed-up speculative decoding aims at needs "
          "hardware where it barely does (a GPU) or a head that is accepted more often.")
if any(s["output_token_ids"] != p["output_token_ids"] for s, p in zip(spec["outputs"], plain["outputs"])):
    sys.exit("speculative output differs from plain decoding")
PY
