#!/usr/bin/env bash
# Creates .venv with the pinned stack, or reuses it when nothing changed.
#
# Usage: tools/setup_env.sh            (idempotent; used by `make` targets)
#        FORCE=1 tools/setup_env.sh    (reinstall even if the stamp matches)
#
# TensorFlow Federated 0.87.0 requires jaxlib==0.4.14, which PyPI never had.
# We install TFF's other pins (with jax/jaxlib 0.4.13) from requirements.txt
# under the full lock in constraints.txt, then TFF itself with --no-deps.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-}"

if [[ -z "$PYTHON" ]]; then
  for candidate in python3.11 python3.10 python3.9 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
fi
if [[ -z "$PYTHON" ]]; then
  echo "setup_env: no python3 found on PATH" >&2; exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(0 if (3, 9) <= sys.version_info[:2] < (3, 12) else 1)'; then
  echo "setup_env: $PYTHON is $("$PYTHON" -V 2>&1); tensorflow-federated 0.87.0 needs Python >=3.9,<3.12." >&2
  echo "setup_env: set PYTHON=/path/to/python3.11 and rerun." >&2
  exit 1
fi

stamp_value="$( (cat requirements.txt requirements-nodeps.txt constraints.txt; "$PYTHON" -V) | sha256sum | cut -d' ' -f1)"
stamp_file="$VENV/.tff_rec_setup_stamp"

if [[ -z "${FORCE:-}" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp_value" ]]; then
  echo "setup_env: $VENV is up to date (requirements unchanged); nothing to install."
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup_env: creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
rm -f "$stamp_file"
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off "$@"; }
pip_install -r requirements.txt -c constraints.txt
pip_install --no-deps -r requirements-nodeps.txt
"$VENV/bin/python" -m pip check >/dev/null 2>&1 || true  # TFF's jaxlib pin is knowingly unmet.
"$VENV/bin/python" -c 'import tensorflow_federated, tensorflow_privacy, tensorflow_model_optimization, dp_accounting' \
  || { echo "setup_env: the installed stack does not import; see the error above." >&2; exit 1; }
echo "$stamp_value" > "$stamp_file"
echo "setup_env: $VENV is ready."
