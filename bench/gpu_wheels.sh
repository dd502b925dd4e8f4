#!/usr/bin/env bash
# Download here, into .whl/, the wheels bench/gpu_session.sh installs on a GPU machine that has no package index:
# the packages that machine's image lacks (bitsandbytes for --quantize nf4, optimum-quanto for int4/int8,
# liger-kernel for the kernel comparisons, num2words for SmolVLM's processor), built for its Python 3.12 on x86-64.
#
#   bash bench/gpu_wheels.sh        # then carry .whl (about 45 MB) with the run
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo "/.whl/" >> .git/info/exclude; }
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl bitsandbytes "optimum-quanto>=0.2.6" liger-kernel num2words
ls -la .whl
