#!/usr/bin/env python3
r"""Kernel time of one whole plan pass, by kernel, from Nsight Compute's log of `cuda_bench plan`.

usage (on the GPU machine):
  ncu --clock-control none --metrics gpu__time_duration.sum --csv --page raw \
      .cuda-carry/cuda_bench plan DIR --plan PLAN --n N --reps 1 > LOG
  scripts/gpu/ncu_pass.py LOG DENSE_KERNEL LAYERS     (e.g. attn_fwd_wsk3_d64 30 for SmolLM2)

`cuda_bench plan --reps 1` runs two plan passes, each followed by a dense pass of LAYERS launches of
DENSE_KERNEL; the pass reported is the second plan pass (the kernels between the two dense passes).
"""
import csv, collections, sys

if len(sys.argv) != 4:
    sys.exit(__doc__)
path, dense, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
lines = open(path).read().splitlines()
start = [i for i, l in enumerate(lines) if l.startswith('"ID"')]
if not start:
    sys.exit(f"{path}: no ncu CSV header (a line starting with \"ID\"); was ncu run with --csv --page raw?")
rows = list(csv.reader(lines[start[0]:]))
hdr = rows[0]
if 'Kernel Name' not in hdr or 'gpu__time_duration.sum' not in hdr:
    sys.exit(f"{path}: the header lacks 'Kernel Name' or 'gpu__time_duration.sum'")
ki = hdr.index('Kernel Name'); ti = hdr.index('gpu__time_duration.sum')
# rows[1] holds the units
data = [(r[ki].split('(')[0], float(r[ti].replace(',', ''))) for r in rows[2:] if len(r) > ti]
runs, i = [], 0
while i < len(data):
    j = i
    while j < len(data) and data[j][0] == dense:
        j += 1
    if j - i >= layers:
        runs.append((i, j)); i = j
    else:
        i += 1
print("kernels", len(data), "dense passes (first, end)", runs)
if len(runs) < 2:
    sys.exit(f"{path}: fewer than two runs of {layers} {dense} launches; is it `cuda_bench plan --reps 1`?")
a, b = runs[-2][1], runs[-1][0]
p = data[a:b]
agg = collections.defaultdict(lambda: [0, 0.0])
for n, t in p:
    agg[n][0] += 1; agg[n][1] += t
tot = sum(t for _, t in p)
print(f"plan pass: {len(p)} kernels, serial kernel sum {tot/1e6:.3f} ms")
for n, (c, t) in sorted(agg.items(), key=lambda x: -x[1][1]):
    print(f"{c:5d} {t/1e3:9.1f} us total {t/c/1e3:8.1f} us avg  {n}")
