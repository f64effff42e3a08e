#!/usr/bin/env bash
# Candidate (measured in benchmarks/README.md): the 128 px same-budget recipe (same_budget_128.sh) with the stem and the first
# stages of the backbone frozen (`--freeze 5`: only the last five parameter groups train), in fp32.
# Variables: those of same_budget_128.sh.
TRAIN_FLAGS="--freeze 5 --amp off" exec bash "$(dirname "$0")/same_budget_128.sh"
