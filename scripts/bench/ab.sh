#!/bin/bash
# Usage: scripts/bench/ab.sh target/release/inception  (the A/B rows of BENCHMARKS.md)
# A/B in one run: kernels (INCEPTION_ISA), int8 vs f32, training engines
B=$1
for r in 1 2; do
  for isa in avx2 avx512; do
    for p in f32 int8; do
      echo "isa=$isa precision=$p b1: $(INCEPTION_ISA=$isa $B bench --model inception_resnet_v2 --batch 1 --threads 2 --precision $p --json | tail -1 | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["median_ms"],1))')"
      echo "isa=$isa precision=$p b8: $(INCEPTION_ISA=$isa $B bench --model inception_resnet_v2 --batch 8 --runs 4 --threads 2 --precision $p --json | tail -1 | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["median_ms"],1))')"
    done
  done
  for e in burn fast; do
    echo "train engine=$e b8: $($B --engine $e bench --model inception_resnet_v2 --batch 8 --mode train --runs 3 --warmup 1 --threads 2 --json | tail -1 | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["median_ms"],1), round(d["peak_rss_mb"]))')"
  done
done
