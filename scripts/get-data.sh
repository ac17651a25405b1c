#!/bin/sh
# Make Fashion-MNIST available offline: Debian's dataset-fashion-mnist package, installed when
# we are root on a Debian/Ubuntu machine and it is missing. Elsewhere, say how to get it.
set -eu
dir=/usr/share/datasets/fashion-mnist
if [ -n "${SPLITEXIT_DATA:-}" ] || [ -f "$dir/t10k-images-idx3-ubyte.gz" ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    exit 0
fi
echo "Fashion-MNIST not found in $dir." >&2
echo "Install it with 'sudo apt-get install dataset-fashion-mnist', or put the four IDX files" >&2
echo "in a folder and set SPLITEXIT_DATA to it; splitexit downloads them itself when online." >&2
