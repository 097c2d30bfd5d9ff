#!/usr/bin/env bash
# Build, here (where the package index is reachable), the wheels scripts/gpu_check.sh installs on
# a GPU machine that lacks omegaconf: .gpu_wheels/ (git-ignored; carry it, well under 64 MiB).
#
# The omegaconf version is this venv's (what the tests run with), or OMEGACONF_SPEC. omegaconf
# 2.3 needs antlr4-python3-runtime==4.9.*, an sdist only: `pip wheel` builds its wheel; 2.4
# vendors antlr and needs only PyYAML. PyYAML's wheel is left out: the GPU machine has PyYAML,
# and a wheel built here is for this Python and platform only.
#
#   bash scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEST=.gpu_wheels
if [ -n "${OMEGACONF_SPEC:-}" ]; then
  SPEC=$OMEGACONF_SPEC
else
  VERSION=$("$PYTHON" -c "import omegaconf; print(omegaconf.__version__)" 2>/dev/null || true)
  SPEC=${VERSION:+omegaconf==$VERSION}
  SPEC=${SPEC:-omegaconf>=2.3}
fi

probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
echo "[gpu_wheels] checking that the package index serves $SPEC"
if ! timeout 180 "$PYTHON" -m pip download --quiet --no-deps --dest "$probe" "$SPEC"; then
  echo "[gpu_wheels] cannot download $SPEC: is the package index reachable from here" \
    "(pip's index settings, a proxy)? Nothing written." >&2
  exit 2
fi

rm -rf "$DEST"
mkdir -p "$DEST"
"$PYTHON" -m pip wheel --quiet --wheel-dir "$DEST" "$SPEC"
rm -f "$DEST"/PyYAML-*.whl "$DEST"/pyyaml-*.whl
for wheel in "$DEST"/*.whl; do
  case "$wheel" in
    *-none-any.whl) ;;
    *) echo "[gpu_wheels] warning: $wheel is not pure Python: it may not fit the GPU machine" >&2 ;;
  esac
done
ls -l "$DEST"
kib=$(du -sk "$DEST" | cut -f1)
echo "[gpu_wheels] $DEST: ${kib} KiB"
if [ "$kib" -gt $((60 * 1024)) ]; then
  echo "[gpu_wheels] $DEST is over 60 MiB: too large to carry" >&2
  exit 1
fi
