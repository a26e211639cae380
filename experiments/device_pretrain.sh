#!/usr/bin/env bash
# The prepared accelerator check of issue #21: on a lent GPU / TPU host, from the repository root,
#   bash experiments/device_pretrain.sh [MINUTES] [OUT_JSON]
# ViT-S/16 MUSE pretraining in bf16 for MINUTES (default 6) on BRCA-M2C train + val and CMU slide regions, export,
# kNN / linear against random init and raw pixels; every figure in OUT_JSON (default runs/device/result.json).
# Needs: a Python with the pinned requirements (PYTHON, default .venv/bin/python) and the data:
#   BRCA=<BRCA-M2C folder> (default ../shared/data/BRCA-M2C), SLIDE=<CMU-1-Small-Region folder> (optional).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-6}
OUT=${2:-runs/device/result.json}
PYTHON=${PYTHON:-.venv/bin/python}
BRCA=${BRCA:-../shared/data/BRCA-M2C}
SLIDE=${SLIDE:-../shared/data/CMU-1-Small-Region}
ROOT=${ROOT:-runs/device}
WORKERS=${WORKERS:-$(( $(nproc) > 2 ? $(nproc) - 2 : 0 ))}
mkdir -p "$ROOT"
SOURCE="brca:$BRCA"
REGION_MPP=0
if [ -d "$SLIDE" ]; then
  [ -f "$ROOT/slide_regions/regions.json" ] || PYTHONPATH=. "$PYTHON" experiments/study.py slide --brca "$BRCA" \
      --slide "$SLIDE" --root "$ROOT"
  SOURCE="$SOURCE|folder:$ROOT/slide_regions"
  REGION_MPP=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['mpp'])" "$ROOT/slide_regions/regions.json")
fi
rm -rf "$ROOT/pretrain"
"$PYTHON" -m experiments.device_pretrain --config "${CONFIG:-vit_s16}" --dtype "${DTYPE:-bfloat16}" \
  --minutes "$MINUTES" --data "$SOURCE" --region_mpp "$REGION_MPP" --eval_data "$BRCA" --workers "$WORKERS" \
  --workdir "$ROOT/pretrain" --out "$OUT" ${BATCH:+--batch "$BATCH"}
