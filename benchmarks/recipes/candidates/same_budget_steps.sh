#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the 128 px same-budget recipe (same_budget_128.sh) with its cosine moved after every
# update (down to 1% of the learning rate at the end) and a warmup over the first 0.2 epoch.
# Variables: those of same_budget_128.sh.
TRAIN_FLAGS="--sched_on_updates --warmup_epochs 0.2" exec bash "$(dirname "$0")/same_budget_128.sh"
