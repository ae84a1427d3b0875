#!/usr/bin/env bash
# The main job end to end on the built-in default: SmolLM2-135M-Instruct on the CPU backend.
# convert (base + draft head) -> build (torch engine) -> run (speculative and plain, compared).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash build_scripts/setup_env.sh
bin="${REDRAFTER_VENV:-$root/.venv}/bin"
work="${REDRAFTER_DEMO_DIR:-$root/.demo}"
mkdir -p "$work"
if [ ! -f "$work/ckpt/config.json" ]; then
  "$bin/redrafter-convert" --model_dir smollm2 --random_drafter --output_dir "$work/ckpt" \
    --redrafter_num_beams 4 --redrafter_draft_len_per_beam 4 --overwrite
fi
if [ ! -f "$work/engine/config.json" ]; then
  "$bin/redrafter-build" --checkpoint_dir "$work/ckpt" --output_dir "$work/engine" --backend torch \
    --max_batch_size 4 --max_seq_len 1024 --max_input_len 512 --overwrite
fi
prompts=("What is the capital of France?" "Write a haiku about the sea.")
echo "== speculative (greedy) =="
"$bin/redrafter-run" --engine_dir "$work/engine" --use_chat_template --max_output_len 48 \
  --input_text "${prompts[@]}" --json > "$work/spec.json"
echo "== plain decoding (greedy) =="
"$bin/redrafter-run" --engine_dir "$work/engine" --use_chat_template --max_output_len 48 \
  --input_text "${prompts[@]}" --json --no_speculation > "$work/plain.json"
"$bin/python" - "$work/spec.json" "$work/plain.json" <<'PY'
import json, sys
spec, plain = (json.load(open(p)) for p in sys.argv[1:3])
for i, (s, p) in enumerate(zip(spec["outputs"], plain["outputs"])):
    print(f"[{i}] {s['output_text']!r}")
    print(f"    identical to plain decoding: {s['output_token_ids'] == p['output_token_ids']}")
print(f"speculative: {spec['tokens_per_step']:.2f} tokens/step, {spec['wall_s']:.2f} s; "
      f"plain: {plain['tokens_per_step']:.2f} tokens/step, {plain['wall_s']:.2f} s")
if any(s["output_token_ids"] != p["output_token_ids"] for s, p in zip(spec["outputs"], plain["outputs"])):
    sys.exit("speculative output differs from plain decoding")
PY
