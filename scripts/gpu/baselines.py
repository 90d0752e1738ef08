#!/usr/bin/env python3
"""Baselines in the same device run as `cuda_bench bench DIR --write-inputs`.

Usage: baselines.py OUT_JSON DIR...  (each DIR holds bench.json, q/k/v.bf16 and our flat index)

On identical inputs: PyTorch SDPA cuDNN (K/V expanded to 32 heads: cuDNN's GQA path is not used),
PyTorch SDPA flash (FA2, enable_gqa=True), and MInference's Triton vertical-slash kernel
(`_triton_mixed_sparse_attention`, copied unmodified into .cuda-carry/minference/, not committed) on our
indexes converted to its padded (block_count, block_offset, column_count, column_index) form, K/V
expanded outside the timed region. Times: CUDA events, 2 warm-ups, median of REPS (env, default 5).
Prints one table row per length and writes all figures (ours from bench.json too) to OUT_JSON.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPS = int(os.environ.get("REPS", "5"))


def load_bf16(path, shape):
    a = np.fromfile(path, dtype=np.uint16).view(np.int16)
    return torch.from_numpy(a).view(torch.bfloat16).reshape(shape)


def load_u32(path):
    return torch.from_numpy(np.fromfile(path, dtype=np.uint32).astype(np.int64))


def time_ms(fn, reps=REPS):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return float(np.median(ts))


def padded(off, idx, m, scale, dev):
    """CSR (off [m+1], idx) -> counts [m] int32 and a padded [m, max] int32 table (idx * scale)."""
    off = off.to(dev)
    counts = off[1:] - off[:-1]
    width = max(int(counts.max().item()), 1)
    table = torch.zeros(m, width, dtype=torch.int32, device=dev)
    if idx.numel():
        rows = torch.repeat_interleave(torch.arange(m, device=dev), counts)
        pos = torch.arange(idx.numel(), device=dev) - off[:-1][rows]
        table[rows, pos] = (idx.to(dev) * scale).to(torch.int32)
    return counts.to(torch.int32), table


def run(d: Path, dev):
    b = json.loads((d / "bench.json").read_text())
    n, hq, hkv, hd = b["n"], b["q_heads"], b["kv_heads"], b["head_dim"]
    q = load_bf16(d / "q.bf16", (1, hq, n, hd)).to(dev)
    k = load_bf16(d / "k.bf16", (1, hkv, n, hd)).to(dev)
    v = load_bf16(d / "v.bf16", (1, hkv, n, hd)).to(dev)
    r = dict(b)
    g = hq // hkv
    ke, ve = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    reps = REPS if n < 131072 else 3
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        r["cudnn_ms"] = time_ms(lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True), reps)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        r["flash_ms"] = time_ms(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), reps
        )
    try:
        sys.path.insert(0, str(Path(".cuda-carry/minference").resolve()))
        from pit_v2 import _triton_mixed_sparse_attention

        qb = (n + 63) // 64
        m = hq * qb
        bc, bo = padded(load_u32(d / "blk_off.u32"), load_u32(d / "blk_idx.u32"), m, 64, dev)
        cc, co = padded(load_u32(d / "col_off.u32"), load_u32(d / "col_idx.u32"), m, 1, dev)
        bc, cc = bc.reshape(1, hq, qb), cc.reshape(1, hq, qb)
        bo, co = bo.reshape(1, hq, qb, -1), co.reshape(1, hq, qb, -1)
        seqlens = torch.tensor([n], dtype=torch.int32, device=dev)
        r["minference_triton_ms"] = time_ms(
            lambda: _triton_mixed_sparse_attention(q, ke, ve, seqlens, bc, bo, cc, co, hd**-0.5, 64, 64)
        )
    except Exception as e:  # report, keep the other baselines
        r["minference_triton_error"] = repr(e)[:300]
    del ke, ve
    torch.cuda.empty_cache()
    return r


def main():
    out = Path(sys.argv[1])
    dev = torch.device("cuda")
    rows = []
    for d in sys.argv[2:]:
        rows.append(run(Path(d), dev))
        out.write_text(json.dumps(rows, indent=1))
    hdr = (
        f"{'N':>7} {'dens':>5} {'est':>6} {'sel':>6} {'attn':>7} {'e2e':>7} {'idx%':>5} {'ours-dense':>10} "
        f"{'cuDNN':>8} {'FA2':>8} {'MInf-Triton':>11} {'vs cuDNN':>8} {'vs MInf':>7} {'dense/FA2':>9}"
    )
    print(hdr)
    for r in rows:
        mi = r.get("minference_triton_ms", float("nan"))
        print(
            f"{r['n']:>7} {r['density']:>5.3f} {r['estimate_ms']:>6.2f} {r['select_ms']:>6.2f} "
            f"{r['sparse_attn_ms']:>7.2f} {r['e2e_ms']:>7.2f} {100 * r['index_share']:>5.1f} {r['dense_ms']:>10.2f} "
            f"{r['cudnn_ms']:>8.2f} {r['flash_ms']:>8.2f} {mi:>11.2f} {r['cudnn_ms'] / r['e2e_ms']:>8.2f} "
            f"{mi / r['sparse_attn_ms']:>7.2f} {r['flash_ms'] / r['dense_ms']:>9.2f}"
        )
        if "minference_triton_error" in r:
            print("  MInference:", r["minference_triton_error"])


if __name__ == "__main__":
    main()
