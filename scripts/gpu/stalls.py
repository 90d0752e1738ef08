#!/usr/bin/env python3
"""Stall samples of one Nsight Compute profile by source line and by part of the kernel.

Reads the `profile-source.csv` that scripts/gpu/profile.sh writes (SASS rows with their warp stall
samples, under the CUDA source line they come from) and prints the lines with the most samples,
their three largest stall reasons, and the shares of the parts of attention.cu's warp-specialized
kernel: the producer (its branch of attn_fwd_ws and TileMerge), the consumers' loop, the softmax
helpers, and the helpers of common.cuh and wgmma.cuh (shared by both roles, named by file).

NVRTC compiles common.cuh + wgmma.cuh + the kernel file as one source, so the profile's line numbers
count from the start of common.cuh; this script maps them back to the files as they are in the
checkout, which must be the commit the profiled binary was built from.

usage: scripts/gpu/stalls.py PROFILE_SOURCE_CSV [TOP_LINES]
"""
import collections
import csv
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'runtime', 'kernels')
FILES = ['common.cuh', 'wgmma.cuh', 'attention.cu']


def sources():
    """[(file, line, text)] in NVRTC's order (the kernel source as device.rs concatenates it)."""
    out = []
    for f in FILES:
        with open(os.path.join(ROOT, f)) as fh:
            out += [(f, i + 1, t) for i, t in enumerate(fh.read().split('\n'))]
    return out


def first_line(lines, marker):
    for f, l, t in lines:
        if f == 'attention.cu' and marker in t:
            return l
    raise SystemExit(f"marker not found in attention.cu: {marker!r}")


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    top_n = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    cat = sources()
    # the parts of attention.cu, found by markers rather than line numbers
    parts = [
        ('softmax', first_line(cat, 'float exp2_fma(float x)'), first_line(cat, 'void store_rows(')),
        ('consumers (MMA issue)', first_line(cat, 'void wg_issue_s('), first_line(cat, '// Pipelined one-warpgroup variant')),
        ('producer (merge)', first_line(cat, 'struct TileMerge {'), first_line(cat, '#define SCHED_COLUMN')),
        ('producer', first_line(cat, '// ---- producer ----'), first_line(cat, '// ---- consumers ----')),
        ('consumers', first_line(cat, '// ---- consumers ----'), first_line(cat, '#define WS_ARGS')),
    ]

    def part(line):
        if not line or line - 1 >= len(cat):
            return 'unknown'
        f, l, _ = cat[line - 1]
        if f != 'attention.cu':
            return f
        for name, lo, hi in parts:
            if lo <= l < hi:
                return name
        return 'attention.cu, other (set-up, output store)'

    with open(sys.argv[1]) as fh:
        rows = list(csv.reader(fh))
    hdr_at = next(i for i, r in enumerate(rows) if 'Warp Stall Sampling (All Samples)' in r)
    hdr = rows[hdr_at]
    ix = {h: i for i, h in enumerate(hdr)}
    s_col = ix['Warp Stall Sampling (All Samples)']
    stalls = [h for h in hdr if h.startswith('stall_') and 'Not Issued' not in h]
    # Code inlined from a helper appears under the helper's line and again under its call site: an
    # address is counted once in the total and in the parts, under every line in the per-line list.
    per = collections.defaultdict(collections.Counter)
    lines_of = collections.defaultdict(list)  # address -> its source lines
    samples = {}  # address -> its samples
    line = None
    for r in rows[hdr_at + 1:]:
        if r and r[0] != '':  # a CUDA source row: the SASS rows below belong to it
            try:
                line = int(r[0])
            except ValueError:
                line = None
            continue
        try:
            n = int(r[s_col])
        except (ValueError, IndexError):
            n = 0
        addr = r[2]
        lines_of[addr].append(line)
        samples[addr] = n
        c = per[line]
        c['all'] += n
        for h in stalls:
            try:
                c[h] += int(r[ix[h]])
            except (ValueError, IndexError):
                pass
    total = sum(samples.values())
    if total == 0:
        raise SystemExit("no stall samples in the profile")
    print(f"{total} stall samples ({len(samples)} instructions); a line's share counts the code inlined there")
    for line, c in sorted(per.items(), key=lambda kv: -kv[1]['all'])[:top_n]:
        f, l, t = cat[line - 1] if line and line - 1 < len(cat) else ('?', 0, '')
        top = sorted(((c[h], h[6:]) for h in stalls), reverse=True)[:3]
        reasons = ' '.join(f'{name}={100 * v / total:.1f}' for v, name in top if v)
        print(f"{100 * c['all'] / total:5.1f}% {f}:{l:<5} {reasons:44s} | {t.strip()[:70]}")
    # an address's part: the most specific of its lines' parts
    if os.environ.get('STALLS_OTHER'):
        other = collections.Counter()
        for addr, n in samples.items():
            for x in lines_of[addr]:
                if part(x) == 'attention.cu, other (set-up, output store)':
                    other[cat[x - 1][1]] += n
        print('attention.cu, other:', other.most_common(10))
    rank = {name: i for i, (name, _, _) in enumerate(parts)}
    by_part = collections.Counter()
    for addr, n in samples.items():
        names = [part(x) for x in lines_of[addr]]
        by_part[min(names, key=lambda x: rank.get(x, len(rank)))] += n
    print('by part:')
    for name, v in by_part.most_common():
        print(f"  {name:22s} {100 * v / total:5.1f}%")


if __name__ == '__main__':
    main()
