#!/usr/bin/env bash
# Builds the CUDA emulator, a libcuda.so that runs tuna's CUDA kernels on the CPU (emu.h says
# how), into $1 (default target/cuda-emu). With its folder on LD_LIBRARY_PATH, cudarc loads it
# as the driver, and every CUDA path of the crate runs: launchers, kernels, model, training.
#
#   bash tools/cuda-emu/build.sh && LD_LIBRARY_PATH=$PWD/target/cuda-emu cargo test --test lora_devices
#
# Each kernels-cuda/*.cu file becomes one C++ file: the source, with its
# dynamic shared memory declaration turned into the emulator's buffer, and a registration of
# each extern "C" kernel by name.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-target/cuda-emu}
mkdir -p "$out/gen"
objs=()
pids=()
for cu in kernels-cuda/*.cu; do
  stem=$(basename "$cu" .cu)
  gen="$out/gen/$stem.cpp"
  {
    echo "#include \"emu.h\""
    echo "#include \"registry.h\""
    echo "#line 1 \"$cu\""  # messages name the kernel's own file and line
    sed -E 's/extern __shared__ (__align__\([0-9]+\) )?([A-Za-z_ ]*[A-Za-z_]) ([A-Za-z_0-9]+)\[\];/\2* \3 = (\2*)emu::dynamic_smem();/' "$cu"
    # The kernels' names, after macro expansion (several are made by macros).
    g++ -E -P -x c++ -DTUNA_CUDA_EMU_SCAN -include tools/cuda-emu/emu.h -I kernels-cuda "$cu" |
      grep -oE 'extern "C" +__global__ +void +[A-Za-z_0-9]+ *\(' | sed -E 's/.* ([A-Za-z_0-9]+) *\($/\1/' |
      while read -r k; do echo "static emu::Register reg_$k(\"$k\", &emu::invoke<&$k>);"; done
  } > "$gen.new"
  # Keep the old file (and its object) when nothing changed.
  if cmp -s "$gen.new" "$gen" && [ -e "$out/gen/$stem.o" ]; then rm "$gen.new"; else mv "$gen.new" "$gen"; rm -f "$out/gen/$stem.o"; fi
  objs+=("$out/gen/$stem.o")
done
flags=(-std=c++17 -O2 -g -fPIC -Wall -Wno-unknown-pragmas -Wno-unused-function -Wno-unused-variable -Wno-psabi -I tools/cuda-emu -I kernels-cuda)
# An object is rebuilt when any header or emulator source is newer (the generated file of a
# kernel changes with its .cu alone).
fresh() {
  local f
  for f in tools/cuda-emu/*.h tools/cuda-emu/*.cpp kernels-cuda/*.cuh; do [ "$1" -nt "$f" ] || return 1; done
}
emu_objs=("$out/runtime.o" "$out/hopper.o")
for o in "${objs[@]}" "${emu_objs[@]}"; do
  [ -e "$o" ] && fresh "$o" && continue
  src=${o%.o}.cpp
  extra=(-fsanitize=alignment)  # kernels: each access checked for its type's alignment (runtime.cpp handles it)
  case "$o" in "$out"/runtime.o|"$out"/hopper.o) src=tools/cuda-emu/$(basename "$src"); extra=() ;; esac
  g++ "${flags[@]}" "${extra[@]}" -c "$src" -o "$o" &
  pids+=($!)
  if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p"; done
g++ -shared -o "$out/libcuda.so" "${emu_objs[@]}" "${objs[@]}"
echo "$out/libcuda.so"
