#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the 128 px same-budget recipe (same_budget_128.sh) trained in fp32 (`--amp off`)
# instead of what `--amp auto` picks on a CPU with native bf16 (bf16); inference keeps its default.
# Variables: those of same_budget_128.sh.
TRAIN_FLAGS="--amp off" exec bash "$(dirname "$0")/same_budget_128.sh"
