#!/usr/bin/env bash
# tests/test_int8.py also runs the int8 checks on an emulated AVX2-only CPU (qemu-x86_64 -cpu Haswell, Debian
# package qemu-user). Installs it as root where apt-get exists; otherwise those checks skip with the reason.
# Does nothing when qemu-x86_64 is present or the machine is not x86_64.
set -euo pipefail
if [ "$(uname -m)" != x86_64 ] || command -v qemu-x86_64 >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y --no-install-recommends qemu-user >/dev/null 2>&1 \
        || { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends qemu-user >/dev/null 2>&1; } \
        || echo "warning: could not install qemu-user; the emulated AVX2 int8 checks will be skipped" >&2
else
    echo "warning: qemu-x86_64 missing (apt-get install qemu-user as root); the emulated AVX2 int8 checks will be skipped" >&2
fi
