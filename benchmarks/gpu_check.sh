#!/usr/bin/env bash
# One prepared command for a machine with one NVIDIA GPU (about 8 minutes at most), run from the repository root:
#   bash benchmarks/gpu_check.sh
# It sets up its own environments under $GPU_CHECK_VENVS (default /tmp/evomerge-gpu-check): main (the python3 there
# when it already has a CUDA torch, else the CUDA torch from PyPI; the project's dependencies when PyPI is reachable)
# and vllm (python3's own when it has one, else installed from PyPI in the background), then checks
#   parity   the CUDA materializer's TIES and DARE-TIES output equals the CPU's (0.2B bf16 Llama, base + 3 experts)
#   hf_swap  HF in-place swap vs reload per candidate on the GPU (benchmarks/scoring_speed.py --device cuda)
#   memory   device bytes per parameter: bf16 scoring model, materializer after load and at its peak; swap times
#   vllm     recipe push into a running vLLM engine (skipped, with the reason, where unsupported or not installed)
#   vllm_tp  with two or more GPUs: the push at tensor-parallel sizes 1 and 2, each rank merging its shard only
#            (benchmarks/vllm_tp.py: seconds and bytes per rank per candidate)
# Each step has its own time limit inside an overall deadline; a failed step is reported and the others still run.
# Everything goes to $OUT (default ./gpu_check_out): one log and one JSON per step, summary.txt (also printed).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_SECONDS:-470}))
CACHE="${GPU_CHECK_CACHE:-/tmp/evomerge-scale}"
SUMMARY="$OUT/summary.txt"
export VENVS="${GPU_CHECK_VENVS:-/tmp/evomerge-gpu-check}"
mkdir -p "$VENVS"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# this checkout on every Python's path (and its subprocesses': vLLM's workers import fitness), installed or not
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S COMMAND...: run with a time limit (capped by the deadline), log to $OUT/NAME.log, one line.
step() {
  local name=$1 limit=$2 left rc=0 t0
  shift 2
  left=$((DEADLINE - $(date +%s)))
  if ((left < 15)); then say "$name: SKIPPED (the ${GPU_CHECK_SECONDS:-470} s deadline is reached)"; return 0; fi
  ((limit > left)) && limit=$left
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  if ((rc == 0)); then
    say "$name: ok ($(($(date +%s) - t0)) s)"
  elif ((rc == 124 || rc == 137)); then
    say "$name: FAILED, timed out after $limit s (log: $name.log)"
  else
    say "$name: FAILED, exit $rc: $(tail -n 1 "$OUT/$name.log" | cut -c1-300) (log: $name.log)"
  fi
  return 0
}

# --- environment --------------------------------------------------------------------------------------------
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  nproc; free -g | sed -n 2p; python3 --version; } >"$OUT/machine.txt" 2>&1 || true
say "machine: $(head -n 1 "$OUT/machine.txt")"

online() { timeout 8 python3 -c 'import urllib.request as u; u.urlopen("https://pypi.org/simple/pip/", timeout=6)' 2>/dev/null; }
if online; then ONLINE=1; else ONLINE=0; fi
export ONLINE
say "PyPI reachable: $([[ $ONLINE == 1 ]] && echo yes || echo no)"

setup_main() {
  if python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "python3 has a CUDA torch: the main environment reuses it (system site packages)"
    python3 -m venv --system-site-packages "$VENVS/main"
    # the project with its dependencies; where nothing can be fetched, the project alone (the checks need only
    # torch, transformers, safetensors, numba, pyyaml, pydantic, tqdm, which such an image has)
    if [[ $ONLINE == 1 ]]; then "$VENVS/main/bin/pip" install -q -e .; else
      "$VENVS/main/bin/pip" install -q --no-deps --no-build-isolation -e . || echo "(project not installed: PYTHONPATH has it)"; fi
  else
    python3 -m venv "$VENVS/main"
    "$VENVS/main/bin/pip" install -q torch  # PyPI's Linux torch is the CUDA build
    "$VENVS/main/bin/pip" install -q -e .
  fi
  "$VENVS/main/bin/python" -c 'import torch, evomerge; assert torch.cuda.is_available(), "torch sees no GPU"; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'
}

setup_vllm() {  # its own environment (vllm pins its torch); the project comes from PYTHONPATH, not pip, so the
  if python3 -c 'import vllm, numba' 2>/dev/null; then  # two setups never build it at once
    python3 -m venv --system-site-packages "$VENVS/vllm"
  else
    [[ $ONLINE == 1 ]] || { echo "PyPI is not reachable and vllm is not installed here"; exit 1; }
    python3 -m venv "$VENVS/vllm"
    "$VENVS/vllm/bin/pip" install -q vllm numba  # numba: the merge kernels
  fi
  "$VENVS/vllm/bin/python" -c 'import vllm; print("vllm", vllm.__version__)'
}

# vllm's install (large) runs in the background while the other checks run
( timeout --kill-after=10 300 bash -c "set -euo pipefail; $(declare -f setup_vllm); setup_vllm" >"$OUT/setup_vllm.log" 2>&1
  echo $? >"$OUT/setup_vllm.rc" ) &
VLLM_SETUP=$!

step setup 240 bash -c "set -euo pipefail; $(declare -f setup_main); setup_main"
PY="$VENVS/main/bin/python"
CHECK=(benchmarks/gpu_check.py --cache "$CACHE" --out "$OUT")
if [[ -x $PY ]]; then
  step models 120 "$PY" "${CHECK[@]}" models
  step parity 120 "$PY" "${CHECK[@]}" parity
  step hf_swap 150 "$PY" benchmarks/scoring_speed.py --random --backend hf --device cuda --examples 100 \
    --candidates 2 --method ties --out "$OUT/hf_swap.json"
  step memory 120 "$PY" "${CHECK[@]}" memory
else
  say "models, parity, hf_swap, memory: SKIPPED (no environment: see setup.log)"
fi

wait "$VLLM_SETUP" || true
if [[ "$(cat "$OUT/setup_vllm.rc" 2>/dev/null)" == 0 ]]; then
  step vllm 150 "$VENVS/vllm/bin/python" "${CHECK[@]}" vllm
  if (($(nvidia-smi -L 2>/dev/null | grep -c '^GPU') >= 2)); then
    step vllm_tp 240 "$VENVS/vllm/bin/python" benchmarks/vllm_tp.py --models "$CACHE/vllm-tp" --out "$OUT/vllm_tp.json"
  else
    say "vllm_tp: SKIPPED (fewer than two GPUs)"
  fi
else
  say "vllm: SKIPPED (vllm could not be installed: $(tail -n 1 "$OUT/setup_vllm.log" 2>/dev/null | cut -c1-200))"
fi

# --- summary ------------------------------------------------------------------------------------------------
for f in parity memory hf_swap vllm vllm_tp; do
  [[ -s "$OUT/$f.json" ]] && say "$f.json: $(tr -d '\n' <"$OUT/$f.json" | cut -c1-1200)"
done
say "total: $(($(date +%s) - START)) s"
