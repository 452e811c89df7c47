#!/usr/bin/env bash
# The main job: fine-tune all-MiniLM-L6-v2 on SciFact with BM25 hard negatives and print
# SciFact test nDCG@10 for BM25, the model before and after (configs/minilm_scifact.py).
# Extra arguments override the config, e.g. --config.train.batch_size=16.
# T5X_LIKE_MAIN_CONFIG picks another variant (tests run configs/minilm_scifact.py:tiny).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
WORKDIR="${T5X_LIKE_WORKDIR:-runs/minilm_scifact/$(date +%Y%m%d-%H%M%S)}"
exec python -m t5x_like.train --config="${T5X_LIKE_MAIN_CONFIG:-configs/minilm_scifact.py}" \
    --workdir="$WORKDIR" "$@"
