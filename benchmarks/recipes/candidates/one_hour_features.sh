#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the one-hour block with eight 2-epoch members trained on
# cached frozen-stage features (--freeze 4 --cache_features, shared through the cache folder; seeds SEED to
# SEED + 7), then the flip-TTA soft vote, which runs the shared frozen stages once for all eight.
# Variables: those of one_hour_lite0.sh.
: "${OUT:=model/one_hour_features}"
OUT="$OUT" MEMBERS="0 1 2 3 4 5 6 7" TRAIN_FLAGS="--epochs 2 --freeze 4 --cache_features ${TRAIN_FLAGS:-}" \
    exec bash "$(dirname "$0")/one_hour_lite0.sh"
