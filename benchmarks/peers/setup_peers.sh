#!/usr/bin/env bash
# Create the two peer virtualenvs used by benchmarks/bench_peers.py. Idempotent: each venv is built once and
# marked with a stamp file; re-running only repairs what is missing. Both are git-ignored (`.venv-*/`).
#
#   .venv-peers-dallepytorch : DALLE-pytorch 1.6.6 (lucidrains), installed --no-deps because its
#                              `youtokentome` dependency does not build here (needs Cython); we only need
#                              the model code, not its tokenizer.
#   .venv-peers-amused       : diffusers 0.42 aMUSEd pipeline + transformers (CLIP text encoder).
#
# It also installs matplotlib into the project venv (.venv) for the plot, if missing.
#
# torch==2.13.0 is always installed first: on this machine pip resolves it to the CPU build on local disk;
# a bare `torch` requirement with no torch installed would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$(pwd)"
PY="${PY:-python3}"

make_venv() {  # $1 = venv dir
  if [ ! -x "$1/bin/python" ]; then
    "$PY" -m venv "$1"
    "$1/bin/pip" install -q --upgrade pip
  fi
  "$1/bin/python" -c "import torch" 2>/dev/null || "$1/bin/pip" install -q torch==2.13.0
}

# --- DALLE-pytorch ---------------------------------------------------------------------------------------
V1="$ROOT/.venv-peers-dallepytorch"
if [ ! -f "$V1/.stamp-peers" ]; then
  echo "[setup_peers] $V1"
  make_venv "$V1"
  "$V1/bin/pip" install -q --no-deps dalle-pytorch==1.6.6
  # its runtime imports (minus youtokentome / taming-transformers / ftfy-based tokenizers we don't call)
  "$V1/bin/pip" install -q axial-positional-embedding einops rotary-embedding-torch omegaconf "setuptools<81" \
      requests tqdm packaging pyyaml \
      numpy pillow
  "$V1/bin/python" "$ROOT/benchmarks/peers/run_dallepytorch.py" --check
  touch "$V1/.stamp-peers"
else
  echo "[setup_peers] $V1 ok"
fi

# --- aMUSEd (diffusers) ----------------------------------------------------------------------------------
V2="$ROOT/.venv-peers-amused"
if [ ! -f "$V2/.stamp-peers" ]; then
  echo "[setup_peers] $V2"
  make_venv "$V2"
  "$V2/bin/pip" install -q "diffusers==0.42.*" "transformers==5.25.*" accelerate numpy pillow
  "$V2/bin/python" "$ROOT/benchmarks/peers/run_amused.py" --check
  touch "$V2/.stamp-peers"
else
  echo "[setup_peers] $V2 ok"
fi
# --- the plot: matplotlib in the project venv (a benchmark-only dependency, deliberately not in pyproject.toml) ---
if [ -x "$ROOT/.venv/bin/python" ] && ! "$ROOT/.venv/bin/python" -c "import matplotlib" 2>/dev/null; then
  echo "[setup_peers] matplotlib -> $ROOT/.venv (for benchmarks/bench_peers.py's PNG)"
  "$ROOT/.venv/bin/pip" install -q matplotlib
fi
echo "[setup_peers] done"
