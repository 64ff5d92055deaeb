#!/usr/bin/env bash
# The whole GPU benchmark as one script, for an offline H100/H200 machine; the table comes last. Goal: < 8 min.
#
#   bash perf/gpu/prepare.sh        # first, here: wheels in .whl/, tokenizer in .perf/tokenizer
#   bash perf/gpu/run.sh            # there, from a copy of the repo with .whl/ and .perf/
#   ARMS=plain,fast STEPS=35 bash perf/gpu/run.sh     # fewer arms when time is short
#   NO_INSTALL=1 PY=.venv/bin/python RESULTS=/tmp/r bash perf/gpu/run.sh   # dry run on a CPU (tiny shape)
#
# 1. installs LLaMA-Factory and the rest from .whl/ into /tmp/site (../shared/device/README.md, step 2)
# 2. perf/perf_train.py: plain LLaMA-Factory vs train.profile fast (and fast with gradient
#    checkpointing) on a random-init Llama-2-7B shape, bf16, LoRA rank 8, cutoff_len 2048
#    -> reports/perf/<gpu>-llama2-7b.json
# 3. perf/perf_eval.py: generation tokens/s, our evaluate path vs LLaMA-Factory do_predict, on the same
#    random-init base + the adapter the fast arm trained, 32 prompts -> reports/perf/<gpu>-eval.json
# 4. copies the results, configs and logs to $OUT (when set: the device tool's folder) and prints the table.
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
stamp() { echo "[run.sh $(( $(date +%s) - start )) s] $*" >&2; }
PY=${PY:-python3}
TOKENIZER=${TOKENIZER:-.perf/tokenizer}
[ -f "$TOKENIZER/tokenizer.json" ] || { echo "no $TOKENIZER/tokenizer.json: run perf/gpu/prepare.sh first" >&2; exit 2; }
if [ -z "${NO_INSTALL:-}" ]; then
  [ -d .whl ] || { echo "no .whl/: run perf/gpu/prepare.sh first" >&2; exit 2; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
  stamp "installed $(ls .whl | wc -l) wheels"
fi
# the repo's library, src/llmft, without an install (the GPU machine has no build tools for an editable one)
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export DISABLE_VERSION_CHECK=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
$PY -c 'import torch, transformers, peft, llamafactory, pydantic
print("torch", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU",
      "| transformers", transformers.__version__, "| peft", peft.__version__, "| llamafactory", llamafactory.__version__)'
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null || true

WORK=${WORK:-/tmp/perf}
RESULTS=${RESULTS:-reports/perf}
$PY perf/perf_train.py --tokenizer "$TOKENIZER" --work-dir "$WORK" --out-dir "$RESULTS" ${ARMS:+--arms "$ARMS"} \
  ${STEPS:+--steps "$STEPS"} || status=$?
stamp "training benchmark done (exit ${status:-0})"

gpu=$($PY -c 'import os, re, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))')
if [ -f "$WORK/fast/adapter_model.safetensors" ]; then
  $PY perf/perf_eval.py --base "$WORK/model" --adapter "$WORK/fast" --data-dir "$WORK/data" \
    --max-examples "${EVAL_EXAMPLES:-32}" --rounds 1 --json "$RESULTS/$gpu-eval.json" \
    --label "$(cat "$WORK/shape") random-init + fast LoRA" ${EVAL_ARGS:-} || status=$?
  stamp "eval benchmark done"
fi

if [ -n "${OUT:-}" ]; then
  cp "$RESULTS/$gpu"-*.json "$OUT"/ 2>/dev/null || true
  tar -czf "$OUT/perf-work.tar.gz" -C "$WORK" --exclude=model --exclude=data --exclude=hf_cache \
    --exclude='*.safetensors' --exclude='*.bin' --exclude='tokenizer*' . 2>/dev/null || true
fi
$PY perf/perf_train.py --table --out-dir "$RESULTS"
stamp "total"
exit "${status:-0}"
