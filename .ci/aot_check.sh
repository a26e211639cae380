#!/usr/bin/env bash
# Ahead-of-time TPU check: compiles the tiny and vit_s16 pretraining steps for a 4-chip (v5p:2x2x1) and a 16-chip
# (v5p:2x2x4) slice with data-parallel (fsdp=1) and FSDP (fsdp=4) meshes, on this CPU machine. By default each model
# is compiled on both topologies and each mesh kind is used once per model (4 compiles):
#   tiny: 4-chip data-parallel, 16-chip fsdp; vit_s16: 4-chip fsdp, 16-chip data-parallel.
# Per-chip batch: tiny 2, vit_s16 32 (vit_s16's global batch 512 on 16 chips).
# AOT_FULL=1 compiles all 8 combinations; AOT_QUICK=1 only the two tiny ones (the vit_s16 step takes over 10 min
# of CPU per TPU compile on our 2-core machines; the tiny one about 50 s).
# Fails when a step does not compile (sharding errors, compiler RESOURCE_EXHAUSTED) or its per-chip memory exceeds
# the chip (python -m muse_jax.tools.aot exits 1). Installs the optional libtpu pin (requirements-tpu.txt) first.
# Compiles run one after another by default (AOT_JOBS=1): one vit_s16 TPU compile already keeps ~1.6 cores busy and
# peaks at ~9.7 GB of RAM (measured: v5p:2x2x1 fsdp=4, per-chip 32: 436 s wall, 718 CPU-s, max RSS 9.66 GB), so two
# parallel lanes save little on 2 cores and risk running a 16-23 GB CI machine out of memory. AOT_JOBS=2 runs one
# lane per topology. Env: PY (python, default .venv/bin/python), AOT_JOBS (default 1), AOT_LOG_DIR (default: a temp
# dir).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
JOBS=${AOT_JOBS:-1}
LOG_DIR=${AOT_LOG_DIR:-$(mktemp -d)}
mkdir -p "$LOG_DIR"

t0=$(date +%s)
"$PY" -m pip install --disable-pip-version-check -q -r requirements-tpu.txt 2>&1 | grep -v "is ignored" || true
"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('libtpu') is None)" \
  || { echo "aot_check: libtpu is not installed after pip install -r requirements-tpu.txt" >&2; exit 1; }
echo "aot_check: libtpu ready ($(( $(date +%s) - t0 )) s)"

export JAX_PLATFORMS=cpu TPU_WORKER_HOSTNAMES=localhost ALLOW_MULTIPLE_LIBTPU_LOAD=1 TPU_SKIP_MDS_QUERY=1
export TF_CPP_MIN_LOG_LEVEL=2

if [ "${AOT_FULL:-0}" = 1 ]; then
  LANE1="tiny:1 tiny:4 vit_s16:1 vit_s16:4"; LANE2="$LANE1"
elif [ "${AOT_QUICK:-0}" = 1 ]; then  # tiny only: about 1 min of CPU per lane
  LANE1="tiny:1"; LANE2="tiny:4"
else
  LANE1="tiny:1 vit_s16:4"; LANE2="tiny:4 vit_s16:1"
fi

lane() {  # lane TOPOLOGY CASES: compiles the cases (variant:fsdp) for one topology in turn; one line per case.
  local topo=$1 rc=0
  for case in $2; do
    local variant=${case%%:*} fsdp=${case##*:}
    local name="${variant}_${topo//[:x]/_}_fsdp${fsdp}" s=$(date +%s)
    local per_chip=2; [ "$variant" = tiny ] || per_chip=32
    if "$PY" -m muse_jax.tools.aot --config "configs/pretrain.py:$variant" --topology "$topo" \
         --config.mesh.fsdp=$fsdp --per_chip_batch $per_chip > "$LOG_DIR/$name.log" 2>&1; then
      echo "ok    $name ($(( $(date +%s) - s )) s, $(grep -m1 -o 'compiled in [0-9.]* s' "$LOG_DIR/$name.log")):" \
           "$(grep -m1 -o 'per-chip peak.*' "$LOG_DIR/$name.log")"
    else
      rc=1
      echo "FAIL  $name ($(( $(date +%s) - s )) s): see $LOG_DIR/$name.log"
      grep -v '^[WI][0-9]' "$LOG_DIR/$name.log" | tail -5
    fi
  done
  return $rc
}

status=0
if [ "$JOBS" -ge 2 ]; then
  lane v5p:2x2x1 "$LANE1" > "$LOG_DIR/lane1.out" 2>&1 & p1=$!
  lane v5p:2x2x4 "$LANE2" > "$LOG_DIR/lane2.out" 2>&1 & p2=$!
  wait $p1 || status=1
  wait $p2 || status=1
  cat "$LOG_DIR/lane1.out" "$LOG_DIR/lane2.out"
else
  lane v5p:2x2x1 "$LANE1" || status=1
  lane v5p:2x2x4 "$LANE2" || status=1
fi
echo "aot_check: $([ $status -eq 0 ] && echo passed || echo FAILED) in $(( $(date +%s) - t0 )) s (logs: $LOG_DIR)"
exit $status
