#!/usr/bin/env python3
"""Correctness of the CUDA executor against an f64 reference restricted to the computed cells.

Usage: check.py OUT_JSON CASE_DIR...   (each CASE_DIR written by `cuda_bench check`)

Per case: the f64 reference (PyTorch on the GPU, float64) over the cells of the case's index (key
blocks + gathered columns, causal) for every row when n <= 4097, else 1024 rows (first 128, last 128,
768 random); PyTorch bf16 SDPA with the same boolean mask on the same rows, against the same reference.
Rule: our max abs error <= 2 x SDPA's, every output element written (NaN poison gone), and for GPU
vertical-slash indexes, selections that differ from the CPU only at near-ties.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def load_bf16(path, shape):
    a = np.fromfile(path, dtype=np.uint16).view(np.int16)
    return torch.from_numpy(a).view(torch.bfloat16).reshape(shape)


def load_u32(path):
    a = np.fromfile(path, dtype=np.uint32).astype(np.int64)
    return torch.from_numpy(a)


def head_masks(h, qb_count, n, blk_off, blk_idx, col_off, col_idx, dev):
    """Boolean [QB, KB] key-block mask and [QB, n] column mask of head h."""
    kb_count = (n + 63) // 64
    e0, e1 = h * qb_count, (h + 1) * qb_count
    bm = torch.zeros(qb_count, kb_count, dtype=torch.bool, device=dev)
    cm = torch.zeros(qb_count, n, dtype=torch.bool, device=dev)
    for off, idx, m in ((blk_off, blk_idx, bm), (col_off, col_idx, cm)):
        o = off[e0 : e1 + 1].to(dev)
        counts = o[1:] - o[:-1]
        rows = torch.repeat_interleave(torch.arange(qb_count, device=dev), counts)
        vals = idx[int(o[0]) : int(o[-1])].to(dev)
        if vals.numel():
            m[rows, vals] = True
    return bm, cm


def load_case(d: Path, dev):
    """A case written by `cuda_bench check`: meta, Q, K, V and our output (bf16 on `dev`), and the flat
    index (blk_off, blk_idx, col_off, col_idx) on the host."""
    meta = json.loads((d / "meta.json").read_text())
    n, hq, hkv, hd = meta["n"], meta["hq"], meta["hkv"], meta["d"]
    q = load_bf16(d / "q.bf16", (hq, n, hd)).to(dev)
    k = load_bf16(d / "k.bf16", (hkv, n, hd)).to(dev)
    v = load_bf16(d / "v.bf16", (hkv, n, hd)).to(dev)
    out = load_bf16(d / "out.bf16", (hq, n, hd)).to(dev)
    index = tuple(load_u32(d / f"{name}.u32") for name in ("blk_off", "blk_idx", "col_off", "col_idx"))
    return meta, q, k, v, out, index


def head_reference(q, k, v, bm, cm, rows):
    """For one head (q [n, d]; k, v its KV head's) at `rows`: the boolean cells (the index's key blocks
    and columns, causal), the f64 softmax P over them, the f64 reference output and PyTorch's bf16 SDPA
    with the same mask (as f64)."""
    n, hd = k.shape
    j = torch.arange(n, device=k.device)
    qb = rows // 64
    cell = (bm[qb][:, j // 64] | cm[qb]) & (j[None, :] <= rows[:, None])
    s = (q[rows].double() @ k.double().T) / hd**0.5
    p = torch.softmax(s.masked_fill(~cell, float("-inf")), dim=-1)
    ref = p @ v.double()
    sd = F.scaled_dot_product_attention(q[rows][None, None], k[None, None], v[None, None], attn_mask=cell[None, None])
    return cell, p, ref, sd[0, 0].double()


def check_case(d: Path, dev):
    meta, q, k, v, out, (blk_off, blk_idx, col_off, col_idx) = load_case(d, dev)
    n, hq, hkv, hd = meta["n"], meta["hq"], meta["hkv"], meta["d"]
    group = hq // hkv
    qb_count = (n + 63) // 64
    if n <= 4097:
        rows = torch.arange(n, device=dev)
    else:
        g = torch.Generator().manual_seed(n)
        mid = torch.randperm(n - 256, generator=g)[:768] + 128
        rows = torch.cat([torch.arange(128), mid, torch.arange(n - 128, n)]).to(dev)
    ours_err = sdpa_err = 0.0
    ours_rel = 0.0
    for h in range(hq):
        kv = h // group
        bm, cm = head_masks(h, qb_count, n, blk_off, blk_idx, col_off, col_idx, dev)
        _, _, ref, sd = head_reference(q[h], k[kv], v[kv], bm, cm, rows)
        ours = out[h, rows].double()
        e_ours = (ours - ref).abs().max().item()
        e_sdpa = (sd - ref).abs().max().item()
        ours_err = max(ours_err, e_ours if e_ours == e_ours else float("inf"))
        sdpa_err = max(sdpa_err, e_sdpa)
        ours_rel = max(ours_rel, ((ours - ref).norm() / ref.norm()).item())
    sel = meta.get("selection")
    sel_ok = sel is None or sel.get("pass", False)
    ok = ours_err <= 2 * sdpa_err and meta["unwritten"] == 0 and meta["nonfinite"] == 0 and sel_ok
    r = dict(meta)
    r.update(
        rows_checked=int(rows.numel()),
        ours_max_abs=ours_err,
        sdpa_bf16_max_abs=sdpa_err,
        ours_rel_fro=ours_rel,
        ratio=ours_err / sdpa_err if sdpa_err > 0 else float("inf"),
        ok=bool(ok),
    )
    return r


def main():
    out_json = Path(sys.argv[1])
    dev = torch.device("cuda")
    results = []
    for d in sys.argv[2:]:
        r = check_case(Path(d), dev)
        results.append(r)
        sel = r.get("selection") or {}
        print(
            f"{r['index']:7} n={r['n']:6} hq={r['hq']:2} hkv={r['hkv']} d={r['d']:3} density={r['density']:.3f} "
            f"rows={r['rows_checked']:5}  ours {r['ours_max_abs']:.2e}  sdpa-bf16 {r['sdpa_bf16_max_abs']:.2e}  "
            f"ratio {r['ratio']:.2f}  rel {r['ours_rel_fro']:.1e}  unwritten {r['unwritten']}  "
            f"sel {'-' if not sel else ('ok' if sel.get('pass') else 'FAIL')} {'PASS' if r['ok'] else 'FAIL'}",
            flush=True,
        )
    out_json.write_text(json.dumps(results, indent=1))
    bad = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(bad)}/{len(results)} cases pass")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
