#!/usr/bin/env bash
# Compares the SASS of kernel files between a git revision and the working tree (no GPU needed): how an opt-in
# macro is checked to leave the default build untouched, and how much a change shrinks a kernel.
#
#   dev/sass_compare.sh REV [nvcc flags...]          every .cu of csrc/hyperbolic_attention: SAME or DIFF
#   FILES="bwd_hd64_bf16.cu" dev/sass_compare.sh REV -DHYPTORCH_BWD_WGMMA=0
#   dev/sass_compare.sh --count FILE.cu [flags...]  per kernel: SASS instructions, spills (working tree only)
#
# Needs nvcc (sm_90a) and cuobjdump: $CUOBJDUMP, else on PATH, else from the pip wheel nvidia-cuda-cuobjdump
# (pip download nvidia-cuda-cuobjdump --no-deps, unzip, nvidia/cu13/bin/cuobjdump).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
src=hyptorch_flash/csrc/hyperbolic_attention
CUOBJDUMP=${CUOBJDUMP:-$(command -v cuobjdump || true)}
[[ -x $CUOBJDUMP ]] || { echo "no cuobjdump: set CUOBJDUMP (see the header)" >&2; exit 2; }
NVCC_ARGS=(-c -gencode=arch=compute_90a,code=sm_90a -std=c++17 -O3 --expt-relaxed-constexpr)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

sass() {  # sass DIR FILE OUT [flags]: the function bodies' SASS (addresses and encodings kept)
  local dir=$1 file=$2 out=$3
  shift 3
  nvcc "${NVCC_ARGS[@]}" "$@" "$dir/$file" -o "$work/obj.o" 2>"$work/nvcc.txt" || { cat "$work/nvcc.txt" >&2; return 1; }
  # (anonymous namespaces are named after the source path: normalised)
  "$CUOBJDUMP" -sass "$work/obj.o" | grep -v 'Fatbin\|code for\|arch =\|host =\|compile_size\|identifier\|headerflags\|^\s*$' |
    sed 's/_GLOBAL__N__[0-9a-f]*_/_GLOBAL__N__/' >"$out"
}

if [[ ${1:-} == --count ]]; then
  file=$2
  shift 2
  nvcc "${NVCC_ARGS[@]}" -Xptxas -v "$@" "$repo/$src/$file" -o "$work/obj.o" 2>"$work/ptxas.txt"
  echo "$file $*: $(grep -c 'spill stores' "$work/ptxas.txt") kernels, $(grep 'spill' "$work/ptxas.txt" |
    grep -vc ' 0 bytes spill stores, 0 bytes spill loads') with spills"
  "$CUOBJDUMP" -sass "$work/obj.o" | awk '/Function :/ {fn = $3} /^        \/\*[0-9a-f]+\*\// {n[fn]++}
    END {for (f in n) printf "%7d  %s\n", n[f], f}' | sort -k2
  exit 0
fi

rev=${1:?usage: dev/sass_compare.sh REV [nvcc flags...]}
shift
git -C "$repo" archive "$rev" "$src" | tar -x -C "$work"
files=${FILES:-$(cd "$repo/$src" && ls ./*.cu | sed 's|^\./||')}
status=0
for f in $files; do
  sass "$work/$src" "$f" "$work/old.txt" "$@"
  sass "$repo/$src" "$f" "$work/new.txt" "$@"
  if cmp -s "$work/old.txt" "$work/new.txt"; then
    echo "SAME $f $*"
  else
    echo "DIFF $f $* ($(wc -l <"$work/old.txt") vs $(wc -l <"$work/new.txt") lines)"
    status=1
  fi
done
exit $status
