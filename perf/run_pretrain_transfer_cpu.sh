#!/usr/bin/env bash
# The whole chain on CPU, as recorded in BENCHMARKS.md: curate the shared data minus the benchmark
# datasets -> MoCoV2 pretraining (resnet18) -> export -> label-efficiency sweep on ISBI 2012 and
# CDeep3M against a randomly initialised resnet18 U-Net. About an hour on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
cemnet curate --manifest experiments/pretrain_sources_no_benchmarks.yaml --out runs/corpus_pretrain --no-progress
cemnet pretrain --config experiments/shared_mocov2_resnet18_cpu.yaml --trainer.enable_progress_bar false
cemnet export runs/shared_mocov2_resnet18_cpu --out runs/shared_mocov2_resnet18_cpu/encoder.safetensors
python perf/run_label_efficiency.py --reduced --arch resnet18 \
    --encoders runs/shared_mocov2_resnet18_cpu/encoder.safetensors random \
    --fractions 0.05 0.1 0.2 1.0 --seeds 0 1 2 --out runs/label_efficiency_cpu "$@"
