#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the same budget spent on three 1-epoch models: the
# one-hour block (one_hour_lite0.sh: the lite0 same-budget recipe per member, then a flip-TTA soft vote) with three
# members of 1 epoch instead of four of 3 (seeds SEED, SEED + 100 and SEED + 200). With one epoch the
# per-epoch cosine never decays: each member trains at lr 1e-3 and is scored by its weights' average (--ema).
# Variables: those of one_hour_lite0.sh.
: "${OUT:=model/same_budget_trio}"
OUT="$OUT" MEMBERS="0 100 200" TRAIN_FLAGS="--epochs 1 ${TRAIN_FLAGS:-}" exec bash "$(dirname "$0")/one_hour_lite0.sh"
