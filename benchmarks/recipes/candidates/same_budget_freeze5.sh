#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the same-budget recipe with the stem and the first
# stages of the backbone frozen (`--freeze 5`: only the last five parameter groups train), in fp32.
# Variables: those of same_budget.sh.
TRAIN_FLAGS="--freeze 5 --amp off" exec bash "$(dirname "$0")/../same_budget.sh"
