#!/usr/bin/env bash
# Set up everything the project needs on a fresh Debian/Ubuntu machine: the Debian packages that
# carry mini-world data and fonts, a venv with the pinned Python packages, and bvlib itself.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

APT_PACKAGES="dataset-fashion-mnist openclipart-png fonts-urw-base35 fonts-dejavu-core chromium chromium-driver"
missing=$(for p in $APT_PACKAGES; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing Debian packages: $missing"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing python3-venv >/dev/null || \
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -m pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -m pip install -q --no-deps animal-mnist==0.4 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -m pip install -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import torch, torchvision, open_clip, papermill, nbval, animal_mnist, bvlib" \
  || { echo "setup failed: the venv cannot import the project's packages" >&2; exit 1; }
echo "setup done: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)')"
