#!/usr/bin/env bash
# Train a SmolLM2-135M draft head on one NVIDIA GPU in under 10 minutes of wall time, and measure
# it through the runtime. Phases and their budgets (defaults; each is printed with its wall time):
#   0. checks (seconds): a CUDA GPU is visible (else exit 2), the prompt packages are installed
#      (else exit 2 naming the package), the output is not the shipped head;
#   1. gen-data, capped at --gen_min minutes (4): the base's greedy answers (--gen_tokens 256
#      tokens) to the human-written requests of the installed prompt sets (WritingBench,
#      Arena-Hard, IFEval, IFBench, HealthBench, LongBench-Write, HELM's prompts, PersistBench,
#      FreshQA: the sets the repository's data/smollm2/human answers; AlpacaEval is held out),
#      batched --gen_batch 256 prompts at a time on the GPU. Batches are appended as
#      they finish, so the cap stops it between batches with what is done; this is the phase
#      that buys the data volume, hence the largest share;
#   2. train, --train_min minutes (3) of optimizer steps (trainer --time_budget_min) plus the base
#      features by teacher forcing (GPU rates: seconds for the ~0.5M tokens): a head of the
#      shipped head's configuration (exit_dim = H, 1 block, RNN, a projection of its own over a
#      draft vocabulary of --draft_vocab ids started from the base's rows, D=4, forward KL over
#      the batch vocabulary), bf16 autocast on the GPU, over the new answers plus the
#      base-written answers in data/smollm2, the answers sampled at temperature 0.7 in
#      data/smollm2/sampled and the ShareGPT conversations;
#   3. eval (about a minute): tokens per step of base + head through the runtime, greedy, W=4 D=4,
#      the first --eval_limit 20 MT-Bench first turns x --eval_tokens 64 new tokens, with the
#      check that speculative output equals plain decoding. With --install the shipped head is
#      measured the same way and the new head replaces it only when its figure is higher.
# The rest of the 10 minutes is process starts and model loads (about 10 s each, four of them).
# None of these budgets has been timed on a GPU yet: the script prints each phase's wall time and
# the total, and says so when the total passes 10 minutes.
#
#   bash build_scripts/gpu_head.sh [OUT_DIR] [options]
#
#   OUT_DIR              the head directory to write (default: $XDG_CACHE_HOME or ~/.cache, then
#                        redrafter_trt/gpu_head); data, feature cache and eval JSON go to
#                        OUT_DIR.work/. The shipped head is never written unless --install.
#   --model_dir DIR      base model: smollm2 (default) or a Hugging Face directory
#   --prompts "SRC.."    gen-data prompt sources (default: "writingbench arena-hard ifeval
#                        ifbench healthbench longbench-write helm-prompts persistbench freshqa")
#   --limit N            first N prompts of each source (default: all)
#   --gen_min M          gen-data wall-time cap in minutes (default: 4)
#   --gen_tokens N       new tokens per answer (default: 256)
#   --gen_batch N        prompts per gen-data batch (default: 256)
#   --extra_data "SRC.." more training data (default with smollm2: "data/smollm2/answers.jsonl
#                        data/smollm2/answers2", every data/smollm2/sampled/seed* directory
#                        and "sharegpt"; otherwise none)
#   --train_min M        training time budget in minutes (default: 3)
#   --max_steps N        a fixed number of optimizer steps instead of --train_min
#   --batch_size N       positions per optimizer step (default: 1024)
#   --draft_vocab K      the head drafts over K token ids (default: the shipped head's K;
#                        --cpu-smoke: half the tiny model's vocabulary)
#   --eval_prompts SRC   eval prompt source (default: mt-bench)
#   --eval_limit N       first N eval prompts (default: 20)
#   --eval_tokens N      new tokens per eval prompt (default: 64)
#   --install            smollm2 only: package the head into redrafter_trt/heads/smollm2 (with
#                        its training report) when its tokens/step beats the shipped head's
#   --cpu-smoke          the same phases on the CPU, for a tiny --model_dir (the CI form); no GPU
#                        needed, small defaults (gen 0.5 min, 16 tokens, batch 8, train 0.25 min,
#                        batch 64, 3 eval prompts x 16 tokens)
#
# Environment: PY (python; default: the repository's .venv), REDRAFTER_THREADS (CPU threads).
# Exit status: 0 done; 1 a phase failed (or --install found the new head no better); 2 a bad
# argument, no GPU, or a missing prompt package.
set -euo pipefail

args=("$@")
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "gpu_head.sh: $*" >&2; exit 2; }
fail() { echo "gpu_head.sh: $*" >&2; exit 1; }

out="" model=smollm2
prompts="writingbench arena-hard ifeval ifbench healthbench longbench-write helm-prompts"
prompts+=" persistbench freshqa"
limit="" extra_data="-"
gen_min="" gen_tokens="" gen_batch="" train_min="" max_steps="" batch_size=""
eval_prompts=mt-bench eval_limit="" eval_tokens="" install=0 smoke=0 draft_vocab=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --install) install=1; shift; continue ;;
    --cpu-smoke) smoke=1; shift; continue ;;
    --*)
      [ $# -ge 2 ] || die "$1 needs a value (--help explains the options)"
      case "$1" in
        --model_dir) model="$2" ;;
        --prompts) prompts="$2" ;;
        --limit) limit="$2" ;;
        --gen_min) gen_min="$2" ;;
        --gen_tokens) gen_tokens="$2" ;;
        --gen_batch) gen_batch="$2" ;;
        --extra_data) extra_data="$2" ;;
        --train_min) train_min="$2" ;;
        --max_steps) max_steps="$2" ;;
        --batch_size) batch_size="$2" ;;
        --draft_vocab) draft_vocab="$2" ;;
        --eval_prompts) eval_prompts="$2" ;;
        --eval_limit) eval_limit="$2" ;;
        --eval_tokens) eval_tokens="$2" ;;
        *) die "unknown option $1 (--help explains the options)" ;;
      esac
      shift 2 ;;
    *)
      [ -z "$out" ] || die "one OUT_DIR expected, got '$out' and '$1'"
      out="$1"; shift ;;
  esac
done

if [ "$smoke" = 1 ]; then
  device=cpu precision=fp32
  : "${gen_min:=0.5}" "${gen_tokens:=16}" "${gen_batch:=8}" "${train_min:=0.25}"
  : "${batch_size:=64}" "${eval_limit:=3}" "${eval_tokens:=16}"
  [ "$model" != smollm2 ] || die "--cpu-smoke needs --model_dir of a tiny Hugging Face model"
  [ "$install" = 0 ] || die "--install ships a GPU-trained head; not with --cpu-smoke"
else
  device=cuda precision=bf16
  : "${gen_min:=4}" "${gen_tokens:=256}" "${gen_batch:=256}" "${train_min:=3}"
  : "${batch_size:=1024}" "${eval_limit:=20}" "${eval_tokens:=64}"
fi
for v in gen_tokens gen_batch batch_size eval_limit eval_tokens ${limit:+limit} \
  ${max_steps:+max_steps}; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "--$v must be a positive integer, got '${!v}'"
done
for v in gen_min train_min; do
  [[ "${!v}" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--$v must be a number of minutes, got '${!v}'"
done
if [ "$extra_data" = "-" ]; then
  if [ "$model" = smollm2 ]; then
    d="$root/data/smollm2"
    extra_data="$d/answers.jsonl $d/answers2 $(printf '%s ' "$d"/sampled/seed*)sharegpt"
  else
    extra_data=""
  fi
fi
if [ "$model" != smollm2 ]; then
  [ -f "$model/config.json" ] || die "--model_dir $model: no config.json (a Hugging Face model \
directory or 'smollm2')"
  model="$(cd "$model" && pwd)"
fi
[ "$install" = 0 ] || [ "$model" = smollm2 ] || die "--install replaces the shipped SmolLM2 \
head: only with --model_dir smollm2"

cache="${XDG_CACHE_HOME:-$HOME/.cache}/redrafter_trt"
out="${out:-$cache/gpu_head}"
mkdir -p "$(dirname "$out")"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
shipped="$root/redrafter_trt/heads/smollm2"
[ "$out" != "$shipped" ] || die "OUT_DIR is the shipped head; write elsewhere and use --install"
work="$out.work"

PY="${PY:-$root/.venv/bin/python}"
[ -x "$PY" ] || command -v "$PY" > /dev/null || die "python not found: $PY (set PY)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
threads=()
if [ -n "${REDRAFTER_THREADS:-}" ]; then threads=(--threads "$REDRAFTER_THREADS"); fi
train() { "$PY" -m redrafter_trt.cli.train "$@"; }
phase() { echo; echo "== $*"; }
json_field() { "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$@"; }
t_all=$SECONDS

# 0. Checks, before any time is spent.
if [ "$smoke" = 0 ]; then
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || die "no CUDA \
GPU visible (torch.cuda.is_available() is False): this recipe needs one NVIDIA GPU; --cpu-smoke \
runs its CPU form on a tiny --model_dir"
fi
# shellcheck disable=SC2086 # the source lists are words
"$PY" - $prompts $extra_data "$eval_prompts" << 'EOF' || exit 2
import sys
from redrafter_trt.formats import datasets
from redrafter_trt.errors import RedrafterError
for src in sys.argv[1:]:
    if src in datasets.BUILTIN:
        try:
            datasets.package_file(src)
        except RedrafterError as e:
            sys.exit(f"gpu_head.sh: prompt set {src!r}: {e}")
EOF
if [ "$model" = smollm2 ]; then
  exit_dim="$(json_field "$shipped/config.json" exit_dim)"
else  # the shipped head's shape: exit_dim = the base's hidden size
  exit_dim="$(json_field "$model/config.json" hidden_size)"
fi
if [ -z "$draft_vocab" ] && [ "$smoke" = 1 ]; then
  draft_vocab=$(($(json_field "$model/config.json" vocab_size) / 2))
elif [ -z "$draft_vocab" ]; then
  draft_vocab="$(json_field "$shipped/config.json" draft_vocab_size)"
fi
[[ "$draft_vocab" =~ ^[1-9][0-9]*$ ]] || die "--draft_vocab must be a positive integer, got '$draft_vocab'"
mkdir -p "$work"
echo "gpu_head.sh: $model on $device ($precision) -> $out (work: $work)"

# 1. The base's greedy answers to human-written requests, capped at gen_min minutes.
phase "1. gen-data: $prompts, $gen_tokens tokens each, $gen_batch per batch, at most $gen_min min"
t=$SECONDS
cap="$("$PY" -c 'import sys; print(max(1, round(float(sys.argv[1]) * 60)))' "$gen_min")"
rc=0
# TERM at the cap; KILL 30 s later if gen-data has not stopped by then (exit 137).
# shellcheck disable=SC2086
timeout --signal=TERM --kill-after=30 "$cap" \
  "$PY" -m redrafter_trt.cli.train gen-data --model_dir "$model" \
  --prompts $prompts ${limit:+--limit "$limit"} --max_new_tokens "$gen_tokens" \
  --batch_size "$gen_batch" --output "$work/answers.jsonl" --device "$device" --overwrite \
  --no_progress "${threads[@]}" >&2 || rc=$?
[ "$rc" = 0 ] || [ "$rc" = 124 ] || [ "$rc" = 137 ] || fail "gen-data failed (exit $rc)"
gen_s=$((SECONDS - t))
# Keep the whole records (the cap may stop a write), then count them.
rm -f "$work/summary.txt"
summary="$work/summary.txt"
"$PY" - "$work/answers.jsonl" "$gen_s" "$rc" << 'EOF' | tee -a "$summary" || fail "no answers"
import json, os, sys
path, seconds, rc = sys.argv[1], max(1, int(sys.argv[2])), sys.argv[3]
rows = []
for line in open(path, encoding="utf-8") if os.path.exists(path) else []:
    try:
        rows.append(json.loads(line))
    except json.JSONDecodeError:
        pass  # a record cut by the time cap
if not rows:
    sys.exit(f"gpu_head.sh: gen-data wrote no whole answer in {seconds} s to {path}")
with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
os.replace(path + ".tmp", path)
tokens = sum(len(r["response_ids"]) for r in rows)
stop = "stopped by the time cap" if rc in ("124", "137") else "all prompts answered"
print(f"data: {len(rows)} requests, {tokens} answer tokens in {seconds} s "
      f"({tokens / seconds:.0f} answer tokens/s, model load included; {stop})")
EOF

# 2. Train a head of the shipped head's configuration on the new answers and the extra data.
if [ -n "$max_steps" ]; then
  length=(--max_steps "$max_steps" --warmup_steps $(((max_steps + 9) / 10)))
else
  length=(--max_steps 1000000 --time_budget_min "$train_min")
fi
phase "2. train: exit_dim=$exit_dim, 1 block, own projection over $draft_vocab ids, D=4, \
${length[*]}"
t=$SECONDS
# shellcheck disable=SC2086
train train --model_dir "$model" --data "$work/answers.jsonl" $extra_data --output_dir "$out" \
  --exit_dim "$exit_dim" --lm_head_init base --draft_vocab_size "$draft_vocab" \
  --num_draft_layers 1 \
  --draft_len 4 --loss kl --kl_vocab batch --precision "$precision" --lr 2e-3 \
  --batch_size "$batch_size" "${length[@]}" --cache_dir "$work/cache" \
  --checkpoint_dir "$work/checkpoints" --device "$device" --overwrite --no_progress \
  "${threads[@]}" >&2 || fail "train failed"
"$PY" - "$out/training_report.json" "$((SECONDS - t))" << 'EOF' | tee -a "$work/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
top1 = " ".join(f"{a:.3f}" for a in r["eval"]["top1_accuracy_per_depth"])
d = r["data_stats"]
print(f"training: {r['steps']} steps, {r['throughput']['positions_per_s']:.0f} positions/s, "
      f"{d['train_positions']} train / {d['eval_positions']} held-out positions, "
      f"held-out top-1 per depth {top1} ({r['precision']} on {r['device']}; {sys.argv[2]} s)")
EOF

# 3. Tokens per step through the runtime.
measure() {  # measure HEAD_DIR JSON -> prints tokens/step
  train eval --model_dir "$model" --drafter_model_dir "$1" --prompts "$eval_prompts" \
    --limit "$eval_limit" --max_new_tokens "$eval_tokens" --redrafter_num_beams 4 \
    --redrafter_draft_len_per_beam 4 --plain_check --output "$2" --device "$device" \
    --no_progress "${threads[@]}" > /dev/null || fail "eval of $1 failed"
  "$PY" - "$2" << 'EOF'
import json, sys
e = json.load(open(sys.argv[1]))
if e.get("identical_to_plain") is not True:
    sys.exit(f"gpu_head.sh: speculative output differs from plain decoding ({sys.argv[1]})")
print(f"{e['tokens_per_step']:.3f}")
EOF
}
phase "3. eval: $eval_limit $eval_prompts prompts x $eval_tokens new tokens, greedy, W=4 D=4"
t=$SECONDS
tps="$(measure "$out" "$work/eval.json")"
echo "eval: $tps tokens/step (trained head, $eval_limit prompts of $eval_prompts x" \
  "$eval_tokens tokens, W=4 D=4, output identical to plain decoding; $((SECONDS - t)) s)" |
  tee -a "$work/summary.txt"
# The head's data card: what this run read and printed (packaged with the head by --install).
{
  echo "# Data card: a draft head trained by build_scripts/gpu_head.sh"
  echo
  echo "- Base model: $model; device: $device ($precision); $(date -u +%Y-%m-%d)."
  echo "- Command: \`bash build_scripts/gpu_head.sh ${args[*]}\`"
  echo "- Training data: the base's greedy answers ($gen_tokens new tokens at most) to the" \
    "prompt sources $prompts (gen-data, in $work/answers.jsonl), plus: ${extra_data:-nothing}."
  echo "- Prompts are read from installed packages or the files named; none is stored here."
  echo "- Head: exit_dim $exit_dim, 1 residual block, RNN, a projection of its own over" \
    "$draft_vocab draft ids (started from the base's rows), D=4, forward KL over the batch" \
    "vocabulary; training_report.json has the rest."
  echo
  echo "What the run printed:"
  echo
  sed 's/^/    /' "$work/summary.txt"
} > "$out/DATA.md"
echo "total: $((SECONDS - t_all)) s"
[ $((SECONDS - t_all)) -le 600 ] || echo "gpu_head.sh: over the 10-minute budget" >&2

if [ "$install" = 1 ]; then
  phase "install: the shipped head measured the same way"
  old="$(measure "$shipped" "$work/eval_shipped.json")"
  echo "eval: trained head $tps tokens/step, shipped head $old tokens/step"
  "$PY" -c 'import sys; sys.exit(0 if float(sys.argv[1]) > float(sys.argv[2]) else 1)' \
    "$tps" "$old" || fail "not installed: the trained head does not beat the shipped one"
  "$PY" -m redrafter_trt.heads.package --head "$out" --model_dir smollm2 --output "$shipped" \
    --own_projection --dtype float16 --overwrite
  echo "installed $out -> $shipped (with its training_report.json and DATA.md)"
fi
