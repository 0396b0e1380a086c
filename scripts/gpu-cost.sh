#!/usr/bin/env bash
# Every GPU figure of the cost work in one device call (each machine start costs minutes):
#   bash ../shared/gpu/make-kit.sh        # here, once: .gpu-kit/ with what the GPU machine lacks
#   device run (carry .gpu-kit):  bash scripts/gpu-cost.sh
# In this order, so that a spent budget drops the least important:
#   1. steps (own budget, GNR_COST_STEP_BUDGET, 240 s): for each model, `gnr bench step` with the fast
#      double backward ("after", which also lists the top 20 CUDA kernels of one gradnorm step), then
#      autograd's ("before"): natural, gradnorm, gradnorm-fd and PGD-3 in one process each;
#   2. AutoAttack (GNR_COST_EVAL=0 skips it): a short demo training run and `gnr bench eval` on it at
#      ε = 4/255, fp32 then bf16 re-checked in fp32, projecting Swin-B's 5000 images;
#   3. the transformers without the explicit attention levels ("after-no-attention").
# Each measurement is a JSON file in $OUT, its log beside it; a failed, timed-out or skipped one is
# reported and the rest go on. The summary at the end reads the JSON files (gpu_cost_summary.py).
#   GNR_COST_SMOKE=1: the same sequence with tiny models on CPU, to check the script itself.
set -uo pipefail
OUT=${OUT:-gpu-cost}
mkdir -p "$OUT"
export GNR_HOME=${GNR_HOME:-$(mktemp -d)} MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
if [ -d .gpu-kit ] && ! python3 -c "import timm, pydantic, mlflow, webdataset, pyautoattack" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu-kit/whl/*.whl \
    || { echo "gpu-cost: installing .gpu-kit failed" >&2; exit 3; }
  export PYTHONPATH=/tmp/site:$PWD/.gpu-kit/site${PYTHONPATH:+:$PYTHONPATH}
fi
# This checkout's gnr, laid out as the wheel installs it (cli/ is gnr.cli), first on the path; python3 -P
# keeps the checkout's own gnr/ (no cli/ inside) off the front of the path.
layout=$(mktemp -d)
mkdir "$layout/gnr" && ln -s "$PWD"/gnr/* "$layout/gnr/" && ln -s "$PWD/cli" "$layout/gnr/cli"
export PYTHONPATH=$layout${PYTHONPATH:+:$PYTHONPATH}
python3 -P -c "import gnr.cli.app, sys; assert gnr.cli.app.__file__.startswith(sys.argv[1])" "$layout/" \
  || { echo "gpu-cost: cannot import this checkout's gnr" >&2; exit 3; }

if [ "${GNR_COST_SMOKE:-0}" = 1 ]; then
  DEVICE=cpu IMG=32 STEPS=1 WARMUP=0 EVAL_N=2 TRAIN_STEPS=4 KERNELS=5
  MODELS=("test_vit 4 keep attn" "test_resnet 4 gelu -")
  PROJECT=(--no-project)
  : "${GNR_COST_LIMIT:=900}" "${GNR_COST_BUDGET:=3600}" "${GNR_COST_STEP_BUDGET:=3600}"  # checks the script, not time
else
  DEVICE=cuda IMG=224 STEPS=5 WARMUP=2 EVAL_N=64 TRAIN_STEPS=0 KERNELS=20
  MODELS=("swin_base_patch4_window7_224 64 keep attn" "vit_base_patch16_224 64 keep attn" "resnet50 128 gelu -")
  PROJECT=(--model swin_base_patch4_window7_224 --batch-size 256)
fi
LIMIT=${GNR_COST_LIMIT:-150}                               # seconds per measurement at most
DEADLINE=$((SECONDS + ${GNR_COST_BUDGET:-540}))              # all of them: a device command may run 600 s
STEP_DEADLINE=$((SECONDS + ${GNR_COST_STEP_BUDGET:-240}))    # the step measurements

measure() {  # NAME ARGS...: gnr ARGS --json > $OUT/NAME.json, within the budget ($deadline)
  local name=$1; shift
  local start=$SECONDS left=$((deadline - SECONDS))
  if [ $left -lt 30 ]; then echo "gpu-cost: $name skipped (budget spent)"; return 1; fi
  timeout $((left < LIMIT ? left : LIMIT)) python3 -P -m gnr.cli.app "$@" --json > "$OUT/$name.json" 2> "$OUT/$name.log"
  local rc=$?
  echo "gpu-cost: $name rc=$rc $((SECONDS - start))s"
  [ $rc = 0 ] || rm -f "$OUT/$name.json"
  return $rc
}

python3 -c "import torch; print('gpu-cost: torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
step_args() {  # MODEL BATCH ACT
  echo bench step --model "$1" --img-size "$IMG" --batch-size "$2" --act "$3" --device "$DEVICE" \
    --methods natural,gradnorm,gradnorm-fd,adversarial --steps "$STEPS" --warmup "$WARMUP"
}
# In order of what matters most, should the budget run out: after/before, AutoAttack, no-attention.
deadline=$STEP_DEADLINE
for spec in "${MODELS[@]}"; do
  read -r model batch act _ <<< "$spec"
  measure "step-$model-after" $(step_args "$model" "$batch" "$act") --kernels "$KERNELS"
  measure "step-$model-before" $(step_args "$model" "$batch" "$act") --no-fast-double-backward
done

deadline=$DEADLINE
if [ "${GNR_COST_EVAL:-1}" != 0 ]; then
  train=(train gradnorm --set "runtime.device=$DEVICE")
  [ "$TRAIN_STEPS" != 0 ] && train+=(--max-steps "$TRAIN_STEPS")
  if measure train-demo "${train[@]}"; then
    run=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['run_id'])" "$OUT/train-demo.json")
    eval_args=(bench eval --run-id "$run" --n "$EVAL_N" --eps 4 --device "$DEVICE" "${PROJECT[@]}")
    measure eval-fp32 "${eval_args[@]}"
    measure eval-bf16 "${eval_args[@]}" --precision bf16
  fi
fi

for spec in "${MODELS[@]}"; do
  read -r model batch act attn <<< "$spec"
  [ "$attn" = attn ] && measure "step-$model-after-no-attention" $(step_args "$model" "$batch" "$act") --no-fast-attention
done
python3 "$(dirname "$0")/gpu_cost_summary.py" "$OUT"
