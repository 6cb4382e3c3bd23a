#!/usr/bin/env bash
# Builds lora-core's unit tests for aarch64 (64-bit Arm, where our CPU kernels take their
# portable NEON-compiled path) on an x86-64 Debian machine and runs them under qemu-user.
# Installs what it needs when missing: Debian's aarch64 cross compiler, qemu-user, the arm64
# C library and OpenSSL (hf-hub's TLS links it), and the Rust target.
#
# Extra arguments go to the test binary, e.g. `scripts/test_aarch64.sh engine::`.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
if ! dpkg -s gcc-aarch64-linux-gnu qemu-user libc6:arm64 libssl-dev:arm64 >/dev/null 2>&1; then
  $SUDO dpkg --add-architecture arm64
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    gcc-aarch64-linux-gnu qemu-user libc6:arm64 libssl-dev:arm64
fi
# `grep` without -q reads all of rustup's output: with -q it could exit first, and under
# pipefail rustup's broken pipe would fail the test.
rustup target list --installed | grep -x aarch64-unknown-linux-gnu >/dev/null \
  || rustup target add aarch64-unknown-linux-gnu

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
# `-L /`: the arm64 loader and C library from the same multiarch package (libc6:arm64). The cross
# toolchain's own copies under /usr/aarch64-linux-gnu can be an older build of glibc than
# libc6:arm64, and qemu then pairs that loader with the newer libc.so.6 from /lib: every thread
# start spins forever in glibc's stack cache.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /"
export PKG_CONFIG_ALLOW_CROSS=1
export OPENSSL_LIB_DIR=/usr/lib/aarch64-linux-gnu OPENSSL_INCLUDE_DIR=/usr/include
# Relative to the repository root.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}/aarch64

cargo test -p lora-core --lib --target aarch64-unknown-linux-gnu -- "$@"
