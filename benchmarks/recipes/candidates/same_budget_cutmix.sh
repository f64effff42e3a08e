#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the same-budget recipe with CutMix (alpha 1.0) on half
# of the batches.
# Variables: those of same_budget.sh.
TRAIN_FLAGS="--cutmix 1.0 --mix_prob 0.5" exec bash "$(dirname "$0")/../same_budget.sh"
