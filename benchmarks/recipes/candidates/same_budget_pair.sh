#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the same budget spent on two models instead of one: the
# one-hour block (one_hour_lite0.sh: the lite0 same-budget recipe per member, then a flip-TTA soft vote) with two members
# of 2 epochs instead of four of 3 (seeds SEED and SEED + 100).
# Variables: those of one_hour_lite0.sh.
: "${OUT:=model/same_budget_pair}"
OUT="$OUT" MEMBERS="0 100" TRAIN_FLAGS="--epochs 2 ${TRAIN_FLAGS:-}" exec bash "$(dirname "$0")/one_hour_lite0.sh"
