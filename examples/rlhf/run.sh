#!/usr/bin/env bash
# RLHF end to end on the embedded tiny model and the arithmetic task (CPU, minutes):
# SFT -> samples of the SFT model labelled by a checker -> reward model -> PPO against it.
# Outputs in runs/rlhf/ (each step refuses to overwrite an earlier run's folder: delete
# runs/rlhf/ or pass overwrite=true to run it again). Run from the repository root:
#   bash examples/rlhf/run.sh
# `make rlhf-demo` runs it with OVERWRITE=1: every step replaces its own earlier output.
set -euo pipefail
ALIGN=${ALIGN:-align}
PYTHON=${PYTHON:-python}
REPLACE=()
if [[ -n "${OVERWRITE:-}" ]]; then REPLACE=(overwrite=true); fi
$ALIGN run examples/rlhf/sft.yaml "${REPLACE[@]}" "$@"
$ALIGN generate --model runs/rlhf/sft/final --prompts examples/data/arith_prompts_train.jsonl \
    --out runs/rlhf/samples.jsonl n=8 temperature=1.0 max_tokens=4 "${REPLACE[@]}"
$PYTHON examples/rlhf/make_pairs.py runs/rlhf/samples.jsonl runs/rlhf/pairs.jsonl
$ALIGN run examples/rlhf/reward.yaml "${REPLACE[@]}" "$@"
$ALIGN run examples/rlhf/ppo.yaml "${REPLACE[@]}" "$@"
