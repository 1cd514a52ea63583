#!/usr/bin/env bash
# The GPU test pass, in pieces that each fit a device call, with every log kept under $OUT.
#
#   bash .ci/gpu_check.sh selected-fsa         # selected attention vs the reference, FSA kernel
#   bash .ci/gpu_check.sh selected-nsa         # the same, NSA kernel
#   bash .ci/gpu_check.sh selected-rest        # the other selected-attention tests (realistic sizes, opcheck, ...)
#                                              # and the FSA index inversion
#   bash .ci/gpu_check.sh ops-layer            # compressed (Triton and cuDNN), compression, window, select_blocks,
#                                              # windows, modules, bad cu_seqlens, the layout, define_op, packed
#                                              # queries fewer than keys, batched caches
#   bash .ci/gpu_check.sh compile              # compile, CUDA graphs, CUDA launch-settings fit
#   bash .ci/gpu_check.sh compile-grid         # compiled vs eager gradients over 12 layer configs (~25 s each)
#   bash .ci/gpu_check.sh export               # export, AOTI, the Inductor kernel-list pins
#   bash .ci/gpu_check.sh models               # the decoder (compiled vs eager), train.py, the README's snippets, the KV cache, generate.py
#
# The whole selected-attention file ran past one 10-minute device call on an H100 (2026-11-26); so did
# compile + export together. The split is by test name. Where pytest-xdist is installed (the H200 image has it)
# each piece runs on 8 workers: the GPU has room for them and compile-heavy pieces are CPU-bound.
#
# Run from the repository root on the device machine. With the preinstalled CUDA torch, the package is used
# from the checkout (PYTHONPATH); expecttest comes from a carried wheel in .whl/ when it is not installed.
set -uo pipefail
case "${1:-}" in
    selected-fsa | selected-nsa | selected-rest | ops-layer | compile | compile-grid | export | models) ;;
    *) echo "usage: bash .ci/gpu_check.sh selected-fsa|selected-nsa|selected-rest|ops-layer|compile|compile-grid|export|models" >&2
       exit 2 ;;
esac
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ! python -c "import expecttest" 2>/dev/null && ls .whl/expecttest-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/expecttest-*.whl
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/card.txt"

run() {  # run NAME LIMIT_S PYTEST_ARGS...
    local name=$1 limit=$2
    shift 2
    local workers=()
    python -c "import xdist" 2>/dev/null && workers=(-n 8)
    timeout "$limit" python -m pytest -q -rfE -p no:cacheprovider -p no:benchmark "${workers[@]}" "$@" 2>&1 | tee "$OUT/$name.log" | tail -5
}

case "${1:-}" in
    selected-fsa) run selected-fsa 560 tests/ops/test_selected_attention.py -k "matches_reference and fsa" ;;
    selected-nsa) run selected-nsa 560 tests/ops/test_selected_attention.py -k "matches_reference and nsa" ;;
    selected-rest) run selected-rest 560 tests/ops/test_selected_attention.py -k "not matches_reference" \
        tests/ops/test_index_inversion.py ;;
    ops-layer) run layer 560 tests/ops/test_compressed_attention.py tests/ops/test_compressed_dense.py \
        tests/test_compression.py tests/ops/test_sliding_window_attention.py \
        tests/ops/test_select_blocks.py tests/ops/test_compression_windows.py tests/test_modules.py \
        tests/test_malformed_cu_seqlens.py tests/ops/test_layout.py tests/ops/test_library.py tests/ops/test_packed_keys.py \
        tests/ops/test_cache_rows.py ;;
    compile) run compile 560 tests/test_compile.py -k "not over_layer_configs" ;;
    compile-grid) run compile-grid 560 tests/test_compile.py -k "over_layer_configs" ;;
    export) run export 560 tests/test_export.py tests/lowerings ;;
    models) run models 560 tests/models tests/test_train.py tests/test_readme.py tests/test_kv_cache.py \
        tests/test_generate.py ;;
esac
