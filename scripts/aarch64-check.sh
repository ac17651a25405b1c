#!/bin/sh
# The aarch64 check (not in CI): install the `device` extra of this checkout into a Debian
# bookworm arm64 userland (what Raspberry Pi OS 64-bit is built on), run under
# qemu-user-static, and run the agent there on the shipped bundle, local-only, torch-free.
# Prints the venv's size and what pip installed; times under emulation mean nothing.
#
#   sudo sh scripts/aarch64-check.sh [ROOTFS]        (ROOTFS default /var/tmp/splitexit-arm64)
#
# Needs root, network, debootstrap and qemu-user-static (apt-get install debootstrap
# qemu-user-static). The rootfs is kept for the next run; delete it to start afresh.
set -eu
rootfs=${1:-/var/tmp/splitexit-arm64}
repo=$(cd "$(dirname "$0")/.." && pwd)
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [ "$(id -u)" != 0 ]; then
    echo "aarch64-check: run as root (debootstrap, binfmt_misc, chroot)" >&2
    exit 2
fi
for tool in debootstrap qemu-aarch64-static; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "aarch64-check: $tool not found: apt-get install debootstrap qemu-user-static" >&2
        exit 2
    fi
done

# arm64 binaries run through qemu: binfmt_misc, with the F flag (no copy in the rootfs)
[ -e /proc/sys/fs/binfmt_misc/register ] ||
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    printf '%s' ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:'"$(command -v qemu-aarch64-static)"':F' \
        >/proc/sys/fs/binfmt_misc/register
fi

if [ ! -x "$rootfs/usr/bin/python3" ]; then
    echo "== debootstrap arm64 bookworm into $rootfs (minutes)"
    debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$rootfs" "$mirror"
fi
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
# the host's CA bundle, so pip in the rootfs trusts what the host trusts (a TLS proxy's CA)
host_ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
[ -f "$host_ca" ] && cp "$host_ca" "$rootfs/etc/ssl/certs/host-ca-certificates.crt"
rm -rf "$rootfs/src" && mkdir -p "$rootfs/src"
tar -C "$repo" -cf - pyproject.toml README.md splitexit device server | tar -C "$rootfs/src" -xf -
mountpoint -q "$rootfs/proc" || mount -t proc proc "$rootfs/proc"
# no /sys: the host's CPU topology crashes numpy under qemu; onnxruntime only warns without it
trap 'umount "$rootfs/proc" 2>/dev/null || true' EXIT

ca=/etc/ssl/certs/host-ca-certificates.crt
# a clean environment: the host's pip and TLS settings point at host paths
chroot "$rootfs" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
    ${HTTPS_PROXY:+HTTPS_PROXY=$HTTPS_PROXY} ${HTTP_PROXY:+HTTP_PROXY=$HTTP_PROXY} \
    PIP_CERT=$ca SSL_CERT_FILE=$ca REQUESTS_CA_BUNDLE=$ca /bin/sh -eu <<'IN'
echo "== $(uname -m), $(python3 --version)"
rm -rf /venv && python3 -m venv /venv
start=$(date +%s)
/venv/bin/pip install --quiet --disable-pip-version-check "/src[device]"
echo "== pip install '.[device]': $(( $(date +%s) - start )) s (emulated)"
if /venv/bin/python -c "import torch" 2>/dev/null; then
    echo "aarch64-check: torch got installed; the device extra must not pull it" >&2
    exit 1
fi
/venv/bin/pip list --disable-pip-version-check --format=freeze
mkdir -p /imgs
/venv/bin/python - <<'PY'
import numpy as np
from splitexit.preprocess import encode_image
rng = np.random.default_rng(0)
for i in range(8):
    open(f"/imgs/{i}.png", "wb").write(encode_image(rng.integers(0, 256, (28, 28, 1), np.uint8)))
PY
bundle=$(/venv/bin/python -c "from splitexit.zoo import default_bundle_path as p; print(p())")
/venv/bin/splitexit-device run --bundle "$bundle" --source /imgs --local-only \
    --runtime onnxruntime --out /records.jsonl
echo "== records: $(wc -l </records.jsonl) of 8"
echo "== venv size: $(du -sm /venv | cut -f1) MiB"
IN
