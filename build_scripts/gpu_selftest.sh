#!/usr/bin/env bash
# GPU self-test of the TensorRT-LLM path, inside nvcr.io/nvidia/tensorrt-llm/release:1.2.1 (see the
# Dockerfile) on any NVIDIA GPU (sm_80 or newer):
#
#   1. builds the plugin library and the CUDA operators (build_scripts/build_plugins.sh);
#   2. kernel checks: every CUDA kernel against its C++ CPU reference (cpp/ redrafter_gpu_check),
#      and the plugin logic tests (pytest tests/test_plugins_logic.py);
#   3. SmolLM2-135M-Instruct + a draft head: convert (float16) and build a trtllm engine and a
#      torch engine from the same checkpoint;
#   4. greedy outputs on MT-Bench prompts: trtllm speculative == trtllm plain decoding (exact), and
#      trtllm == the PyTorch backend on the GPU (same float16 weights);
#   5. reports tokens per step and wall-clock speed-up against plain decoding (redrafter-bench).
#
# Environment: DRAFTER_DIR (a trained head; default: train one for SELFTEST_TRAIN_MIN minutes,
# default 10), SELFTEST_DIR (work dir, default /tmp/redrafter-selftest), SELFTEST_PROMPTS
# (default 16), SELFTEST_MAX_NEW (default 64). Exit status 0 only if every check passed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
work="${SELFTEST_DIR:-/tmp/redrafter-selftest}"
prompts="${SELFTEST_PROMPTS:-16}"
max_new="${SELFTEST_MAX_NEW:-64}"
mkdir -p "$work"
log() { echo "[gpu_selftest] $*" >&2; }

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader \
  || { log "no NVIDIA GPU visible (run the container with --gpus all)"; exit 1; }
python3 -c "import tensorrt_llm, tensorrt; print('TensorRT-LLM', tensorrt_llm.__version__, 'TensorRT', tensorrt.__version__)"

log "1/5 build plugins + CUDA operators"
bash build_scripts/build_plugins.sh
build="${REDRAFTER_PLUGIN_BUILD_DIR:-$root/plugins/build}"
export REDRAFTER_PLUGIN_LIB="$build/libredrafter_trt_plugins.so"
export REDRAFTER_CUDA_LIB="$build/cpp/libredrafter_cuda.so"  # KV relocation kernel for the runtime

log "2/5 kernel checks"
cmake --build "$build" --target redrafter_gpu_check
"$build/cpp/redrafter_gpu_check"
REDRAFTER_PLUGIN_LOGIC_LIB="$build/libredrafter_plugin_logic.so" python3 -m pytest -q -p no:cacheprovider \
  tests/test_plugins_logic.py

log "3/5 convert + build (SmolLM2-135M-Instruct)"
drafter="${DRAFTER_DIR:-}"
if [ -z "$drafter" ]; then
  drafter="$work/drafter"
  if [ ! -f "$drafter/config.json" ]; then
    redrafter-train train --data sharegpt --output_dir "$drafter" --device cuda \
      --time_budget_min "${SELFTEST_TRAIN_MIN:-10}" --no_progress --overwrite
  fi
fi
redrafter-convert --model_dir smollm2 --drafter_model_dir "$drafter" --output_dir "$work/ckpt" \
  --dtype float16 --redrafter_num_beams 4 --redrafter_draft_len_per_beam 4 --overwrite
redrafter-build --checkpoint_dir "$work/ckpt" --output_dir "$work/engine_trtllm" --backend trtllm \
  --max_batch_size 8 --max_input_len 512 --max_seq_len 1024 --overwrite
redrafter-build --checkpoint_dir "$work/ckpt" --output_dir "$work/engine_torch" --backend torch \
  --max_batch_size 8 --max_input_len 512 --max_seq_len 1024 --overwrite

log "4/5 greedy equality"
python3 - "$work" "$prompts" "$max_new" <<'PY'
import sys
import redrafter_trt
from redrafter_trt.formats.datasets import load_prompts

work, n, max_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
prompts = load_prompts("mt-bench", limit=n)
trt = redrafter_trt.load(f"{work}/engine_trtllm")
ref = redrafter_trt.load(f"{work}/engine_torch", device="cuda")
kw = dict(max_new_tokens=max_new, use_chat_template=True)
spec = trt.generate(prompts, **kw)
plain = trt.generate(prompts, speculative=False, **kw)
oracle = ref.generate(prompts, **kw)
bad = 0
for i, (s, p, o) in enumerate(zip(spec, plain, oracle)):
    for name, other in (("trtllm plain", p), ("torch backend", o)):
        if s.token_ids != other.token_ids:
            k = next((j for j, (a, b) in enumerate(zip(s.token_ids, other.token_ids)) if a != b),
                     min(len(s.token_ids), len(other.token_ids)))
            print(f"prompt {i}: trtllm speculative differs from {name} at token {k}")
            bad += 1
steps = sum(len(r.accepted_per_step) - 1 for r in spec)
gen = sum(len(r.token_ids) - r.accepted_per_step[0] for r in spec)
print(f"{len(prompts)} prompts: {bad} mismatches; tokens per step {gen / max(steps, 1):.2f}")
be = trt.backend
print(f"KV relocation: {be.relocate_impl} ({be.relocate_reason}); CUDA graphs: {be.uses_cuda_graphs} "
      f"({be.cuda_graph_reason}); generation calls by path: {dict(be.graph_calls)}")
sys.exit(1 if bad else 0)
PY

log "5/5 bench (tokens per step, speed-up against plain decoding)"
redrafter-bench --engine_dir "$work/engine_trtllm" --dataset mt-bench --num_prompts "$prompts" \
  --batch_sizes 1,4 --max_new_tokens "$max_new" --no_hf_baseline --output_dir "$work/bench"
log "all checks passed; results in $work"
