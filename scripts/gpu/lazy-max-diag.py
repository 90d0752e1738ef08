#!/usr/bin/env python3
"""Where our max error on a `cuda_bench check` case comes from (on the GPU machine, repo root).

Usage: scripts/gpu/lazy-max-diag.py CASE_DIR...   (each written by `cuda_bench check`; key-block
indexes only, e.g. --index gpu-bs)

Per case, the max abs errors against the f64 reference of: our output; a PyTorch replay of the
attention kernels' numerics (the query block's key blocks in order as 64-key tiles, the lazy running
max that moves only when a tile's max passes it by more than 8 in log2 units, P rounded to bf16 for
P V, f32 row sums of the unrounded P, bf16 output); the replay with the rounded P summed; with only
each row's largest P of a tile rounded in the sum; with the max moved at every increase; PyTorch's
bf16 SDPA. Then the worst element of ours: head,
row, column, the row's cell count and its largest normalized P. Findings: docs/perf.md ("Block-sparse
cases at head_dim 64"). Since 909a4eb the head_dim-64 kernel sums the rounded P (by MMA), so "ours"
there matches the rounded-sum replay; run the binary with ATTNPLAN_ROUNDED_SUMS=0 to see the old
numerics.
"""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from check import head_masks, head_reference, load_case  # noqa: E402

DEV = "cuda"
HEADROOM = 8.0  # RESCALE_LOG2 of attention.cu


def bf16(x):
    return x.to(torch.bfloat16).float()


def replay(q, k, v, blocks, n, scale_log2, variant):
    """Our kernels' output (f32 before the final rounding) for one head; `blocks[qb]` are the
    query block's key blocks in order."""
    s_all = q.float() @ k.float().T
    out = torch.empty(n, q.shape[1], device=DEV)
    for qb, kbs in enumerate(blocks):
        r0, r1 = qb * 64, min(n, qb * 64 + 64)
        rows = torch.arange(r0, r1, device=DEV)
        m = torch.full((r1 - r0,), float("-inf"), device=DEV)
        l = torch.zeros(r1 - r0, device=DEV)
        o = torch.zeros(r1 - r0, q.shape[1], device=DEV)
        for kb in kbs:
            c0, c1 = kb * 64, min(n, kb * 64 + 64)
            s = s_all[r0:r1, c0:c1].clone()
            s[torch.arange(c0, c1, device=DEV)[None, :] > rows[:, None]] = float("-inf")
            cand = s.max(1).values * scale_log2
            up = cand > (m if variant == "eager_max" else m + HEADROOM)
            m_new = torch.where(up, cand, m)
            use = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
            alpha = torch.where(up, torch.exp2(m - use), torch.ones_like(m))
            m = m_new
            p = torch.exp2(s * scale_log2 - use[:, None])
            p16 = bf16(p)
            l = l * alpha + (p16 if variant == "rounded_sums" else p).sum(1)
            if variant == "max_corrected":  # the rounding of each row's largest P only
                p_max = torch.exp2(cand - use)
                l = l + (bf16(p_max) - p_max)  # 0 for a row with no key yet (p_max = 2^-inf)
            o = o * alpha[:, None] + p16 @ v[c0:c1].float()
        out[r0:r1] = o / l[:, None]
    return out


def diagnose(case):
    meta, q, k, v, out, (blk_off, blk_idx, col_off, col_idx) = load_case(case, DEV)
    n, hq, hkv, hd = meta["n"], meta["hq"], meta["hkv"], meta["d"]
    group = hq // hkv
    if col_idx.numel():
        raise SystemExit(f"{case}: gathered columns are not replayed; use a key-block index")
    qbs = (n + 63) // 64
    rows = torch.arange(n, device=DEV)
    scale_log2 = math.log2(math.e) / math.sqrt(hd)
    errors = {"ours": 0.0, "replay": 0.0, "rounded_sums": 0.0, "max_corrected": 0.0, "eager_max": 0.0,
              "sdpa": 0.0}
    worst = (0.0, None)
    for h in range(hq):
        kv = h // group
        bm, cm = head_masks(h, qbs, n, blk_off, blk_idx, col_off, col_idx, DEV)
        cell, p64, ref, sdpa = head_reference(q[h], k[kv], v[kv], bm, cm, rows)
        err = (out[h].double() - ref).abs()
        errors["ours"] = max(errors["ours"], err.max().item())
        if err.max().item() > worst[0]:
            row, col = divmod(int(err.argmax()), hd)
            worst = (err.max().item(), dict(head=h, row=row, col=col, cells=int(cell[row].sum()),
                                            top_p=round(p64[row].max().item(), 3)))
        errors["sdpa"] = max(errors["sdpa"], (sdpa - ref).abs().max().item())
        blocks = [blk_idx[int(blk_off[h * qbs + qb]):int(blk_off[h * qbs + qb + 1])].tolist()
                  for qb in range(qbs)]
        for variant in ("replay", "rounded_sums", "max_corrected", "eager_max"):
            o = replay(q[h], k[kv], v[kv], blocks, n, scale_log2, variant)
            errors[variant] = max(errors[variant], (bf16(o).double() - ref).abs().max().item())
    print(f"{case.name} n={n} d={hd}: " + ", ".join(f"{a} {b:.2e}" for a, b in errors.items()))
    print(f"  worst element of ours: {worst[0]:.2e} {worst[1]}")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        diagnose(Path(arg))
