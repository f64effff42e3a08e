#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the same budget spent on three 2-epoch models trained on
# cached frozen-stage features (--freeze 4 --cache_features: the stem and stages 0-2 run once per image
# and mirror image, and the three members share that file through the cache folder), seeds SEED,
# SEED + 100 and SEED + 200, then the one-hour block's flip-TTA soft vote.
# Variables: those of one_hour_lite0.sh.
: "${OUT:=model/same_budget_features}"
OUT="$OUT" MEMBERS="0 100 200" TRAIN_FLAGS="--epochs 2 --freeze 4 --cache_features ${TRAIN_FLAGS:-}" \
    exec bash "$(dirname "$0")/one_hour_lite0.sh"
