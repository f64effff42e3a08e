#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the 128 px same-budget recipe (same_budget_128.sh) with the age head's loss weighted
# 3 instead of 1.5.
# Variables: those of same_budget_128.sh.
TRAIN_FLAGS="--head_weights age=3" exec bash "$(dirname "$0")/same_budget_128.sh"
