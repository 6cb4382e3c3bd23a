# shellcheck shell=bash
# Sourced by the scripts that run binaries built elsewhere on a GPU machine (the NVIDIA driver,
# CUDA 13's libraries and Python there; often no xz and no Rust).

# unpack_binary PYTHON PACKED.xz OUT: unpacks an executable, with Python's lzma where the image
# has no xz.
unpack_binary() {
  if command -v xz >/dev/null; then
    xz -dc "$2" >"$3" || return 1
  else
    "$1" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$2" "$3" || return 1
  fi
  chmod +x "$3"
}

# use_cuda_libraries [LIBRARY…]: puts the folders holding CUDA 13's libraries (the system
# toolkit's or those of PyTorch's wheels) and the further LIBRARY files named (libnccl.so.2,
# libcudnn.so.9…) first on LD_LIBRARY_PATH.
use_cuda_libraries() {
  local names=(libcublasLt.so.13 libcublas.so.13 libcudart.so.13 libcurand.so.10 libnvrtc.so.13 "$@")
  local pattern=() name libs
  for name in "${names[@]}"; do pattern+=(-o -name "$name"); done
  libs=$(find /usr/local /opt /usr/lib -xdev \( "${pattern[@]:1}" \) -print0 2>/dev/null |
    xargs -0 -r -n1 dirname | sort -u | tr '\n' ':')
  export LD_LIBRARY_PATH=${libs%:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}
