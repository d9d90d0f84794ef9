#!/usr/bin/env bash
# Builds a link-time stub of libcudnn (soname libcudnn.so.9) for machines that compile vidgen with
# `--features cuda` but have no cuDNN installed (a build box without a GPU). The binary links against
# the stub's soname; at run time the real cuDNN 9 (e.g. the one PyTorch's pip install carries, found
# through LD_LIBRARY_PATH) is loaded instead. Usage: tools/gpu/cudnn-link-stub.sh DIR; then add DIR to
# LIBRARY_PATH. Symbols come from cudarc's cuDNN bindings, so every function vidgen can call exists.
set -euo pipefail
dir="${1:?usage: cudnn-link-stub.sh DIR}"
sys="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/cudnn/sys/mod.rs | head -1)"
mkdir -p "$dir"
grep -oE 'fn cudnn[A-Za-z0-9_]*' "$sys" | sed 's/^fn //' | sort -u | sed 's/.*/void &(void){}/' >"$dir/cudnn_stub.c"
gcc -shared -fPIC -o "$dir/libcudnn.so" "$dir/cudnn_stub.c" -Wl,-soname,libcudnn.so.9
echo "stub written: $dir/libcudnn.so ($(wc -l <"$dir/cudnn_stub.c") symbols)"
