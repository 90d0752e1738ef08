// Vertical-slash index building on the GPU, all heads of a layer per launch. Same selection as the CPU
// `runtime::pattern::vertical_slash` (see its module docs); stages, in launch order:
//
// 1. vs_est<0>: scores of the last L queries against all keys (mma.sync), per (head, row tile of 64
//    of the last L rows, chunk of est_tiles * 64 keys, est_tiles <= 8 chosen by the host so that small
//    layers still fill the GPU): running max and sum of exp2 per row -> `part`. Only the heads listed
//    in est_heads[0..n_est] (those whose scores are read; the others' stay zero).
// 2. vs_est_reduce: per (head, row): combines the partials into (max, 1 / sum) -> `ml`.
// 3. vs_est<1>: recomputes the scores, writes p = softmax into a shared 64x64 tile, sums it per key
//    column (`col`) and per diagonal offset i - j (`diag`), then global f32 atomics (both zeroed before).
// K tiles are double-buffered with cp.async; CTAs of the heads of one KV group are adjacent in the grid,
// so they read the same K chunk through L2.
// 4. vs_topk: per (head, columns | diagonals), a cluster of CTAs: radix select of the top-k (forced
//    items first, then descending score, ties to the lower index), writes inclusive prefix counts
//    `cum[h][0..=n]` of the selected items and, for columns, the sorted list of selected columns.
// 5. vs_bdiag: per head, the block diagonals qb - kb whose tiles a selected diagonal touches;
//    vs_count: per (head, query block), one warp: the number of key blocks (tiles touched by a selected
//    diagonal, walked through that list, not over all causal key blocks) and of gathered columns
//    (selected columns <= the block's last row, outside those tiles).
// 6. vs_scan: exclusive scan of both count arrays -> `blk_off`, `col_off` (the flattened CSR offsets).
// 7. vs_fill: per (head, query block), one CTA: writes the sorted key blocks and columns.
//
// Scores: q . k in f32 from bf16 products (exact) with tensor-core accumulation order; softmax in f32.
// The CPU reference uses f32 dots and f64 softmax, so selections can differ only at near-ties.


template <int D, int PASS>
__device__ __forceinline__ void vs_est(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, int n,
                                       int group, int last_q, int est_tiles, float scale_log2,
                                       float2* __restrict__ part, const float2* __restrict__ ml,
                                       float* __restrict__ col, float* __restrict__ diag,
                                       const u32* __restrict__ est_heads, int n_est) {
    constexpr int CPR = D / 8, ROWS_PER_PASS = 128 / CPR, PASSES = 64 / ROWS_PER_PASS;
    constexpr int TILE_BYTES = 64 * D * 2;
    constexpr int PLD = 65;  // row stride (floats) of the P tile: conflict-free column and diagonal walks
    extern __shared__ __align__(128) unsigned char smem[];
    const u32 sQ = smem_u32(smem), sK = sQ + TILE_BYTES;  // K: 2 stages
    float* pt = (float*)(smem + 3 * TILE_BYTES);          // [64][PLD] probabilities (PASS 1)

    const int h = (int)est_heads[blockIdx.x % n_est], chunk = blockIdx.x / n_est, rt = blockIdx.y;
    const int chunk_keys = est_tiles * 64, nchunks = (n + chunk_keys - 1) / chunk_keys;
    const int rows_pad = gridDim.y * 64;
    const int i0 = n - last_q + rt * 64;  // first row of this row tile (absolute)
    const int i_last = min(i0 + 63, n - 1);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
    const bf16_t* qh = q + (u64)h * n * D;
    const bf16_t* kh = k + (u64)(h / group) * n * D;
    const int j_first = chunk * chunk_keys;
    // key tiles of this chunk with a causal cell for some row of the tile
    const int ntiles = max(0, min(est_tiles, (min(i_last + 1, n) - j_first + 63) / 64));

    auto load_k = [&](int tt) {
        const int c = tid % CPR, j0 = j_first + tt * 64;
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const int r = tid / CPR + p * ROWS_PER_PASS;
            load_rows_async<D>(sK + (tt & 1) * TILE_BYTES, kh, r, j0 + r < n ? j0 + r : POS_NONE, c);
        }
    };
    {
        const int c = tid % CPR;
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const int r = tid / CPR + p * ROWS_PER_PASS;
            load_rows_async<D>(sQ, qh, r, i0 + r < n ? i0 + r : POS_NONE, c);
        }
        if (ntiles > 0) load_k(0);
        cp_async_commit();
    }
    u32 qf[D / 16][4];
    const int ra = i0 + warp * 16 + g, rb = ra + 8;  // absolute rows of this thread
    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.f, l_b = 0.f;
    float2 mla = make_float2(0.f, 0.f), mlb = mla;
    if (PASS == 1) {
        mla = ml[(u64)h * rows_pad + rt * 64 + warp * 16 + g];
        mlb = ml[(u64)h * rows_pad + rt * 64 + warp * 16 + g + 8];
    }

    for (int tt = 0; tt < ntiles; ++tt) {
        const int j0 = j_first + tt * 64;
        if (tt + 1 < ntiles) load_k(tt + 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if (tt == 0) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                ldsm_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3],
                        sQ + swz<D>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
        }
        const u32 kst = sK + (tt & 1) * TILE_BYTES;
        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int j = 0; j < 8; j += 2) {
                const int r = j * 8 + (lane & 7) + ((lane >> 4) << 3);
                u32 b0, b1, b2, b3;
                ldsm_x4(b0, b1, b2, b3, kst + swz<D>(r, kk * 2 + ((lane >> 3) & 1)));
                mma_bf16(s[j], qf[kk], b0, b1);
                mma_bf16(s[j + 1], qf[kk], b2, b3);
            }
        }
        // Causal mask; rows past n (not among the last L) never count.
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int jj = j0 + j * 8 + 2 * tq + (e & 1);
                const int ii = e < 2 ? ra : rb;
                s[j][e] = (jj <= ii && ii < n) ? s[j][e] * scale_log2 : NEG_INF;
            }
        }
        if (PASS == 0) {
            float mx_a = NEG_INF, mx_b = NEG_INF;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                mx_a = fmaxf(mx_a, fmaxf(s[j][0], s[j][1]));
                mx_b = fmaxf(mx_b, fmaxf(s[j][2], s[j][3]));
            }
            const float na = fmaxf(m_a, mx_a), nb = fmaxf(m_b, mx_b);
            const float ua = na == NEG_INF ? 0.f : na, ub = nb == NEG_INF ? 0.f : nb;
            l_a *= exp2f(m_a - ua);
            l_b *= exp2f(m_b - ub);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                l_a += exp2f(s[j][0] - ua) + exp2f(s[j][1] - ua);
                l_b += exp2f(s[j][2] - ub) + exp2f(s[j][3] - ub);
            }
            m_a = na;
            m_b = nb;
        } else {
            // p = 2^(x - m) / l into the P tile, then per-column and per-diagonal sums over it.
            const int la = warp * 16 + g;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int cc = j * 8 + 2 * tq + e;
                    pt[la * PLD + cc] = s[j][e] == NEG_INF ? 0.f : exp2f(s[j][e] - mla.x) * mla.y;
                    pt[(la + 8) * PLD + cc] = s[j][e + 2] == NEG_INF ? 0.f : exp2f(s[j][e + 2] - mlb.x) * mlb.y;
                }
            }
            __syncthreads();
            if (tid < 64) {
                float c = 0.f;
                for (int r = 0; r < 64; ++r) c += pt[r * PLD + tid];
                if (c != 0.f && j0 + tid < n) atomicAdd(&col[(u64)h * n + j0 + tid], c);
            }
            // diagonal dx (row - column = dx - 63), 127 of them over 128 threads
            {
                const int dx = tid;
                if (dx < 127) {
                    const int r_lo = max(0, dx - 63), r_hi = min(63, dx);
                    float dsum = 0.f;
                    for (int r = r_lo; r <= r_hi; ++r) dsum += pt[r * PLD + r - (dx - 63)];
                    const int off = i0 - j0 + dx - 63;
                    if (dsum != 0.f && off >= 0 && off < n) atomicAdd(&diag[(u64)h * n + off], dsum);
                }
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();
    if (PASS == 0) {
#pragma unroll
        for (int sh = 1; sh <= 2; sh <<= 1) {
            const float oma = __shfl_xor_sync(0xffffffff, m_a, sh), ola = __shfl_xor_sync(0xffffffff, l_a, sh);
            const float omb = __shfl_xor_sync(0xffffffff, m_b, sh), olb = __shfl_xor_sync(0xffffffff, l_b, sh);
            float na = fmaxf(m_a, oma), nb = fmaxf(m_b, omb);
            const float ua = na == NEG_INF ? 0.f : na, ub = nb == NEG_INF ? 0.f : nb;
            l_a = l_a * exp2f(m_a - ua) + ola * exp2f(oma - ua);
            l_b = l_b * exp2f(m_b - ub) + olb * exp2f(omb - ub);
            m_a = na;
            m_b = nb;
        }
        if (tq == 0) {
            const u64 ba = ((u64)h * rows_pad + rt * 64 + warp * 16 + g) * nchunks + chunk;
            part[ba] = make_float2(m_a, l_a);
            part[ba + 8 * (u64)nchunks] = make_float2(m_b, l_b);
        }
    }
}

#define EST_ARGS                                                                                    \
    const bf16_t *__restrict__ q, const bf16_t *__restrict__ k, int n, int group,                  \
        int last_q, int est_tiles, float scale_log2, float2 *__restrict__ part, const float2 *__restrict__ ml,    \
        float *__restrict__ col, float *__restrict__ diag, const u32 *__restrict__ est_heads, int n_est

extern "C" __global__ void __launch_bounds__(128) vs_est_max_d128(EST_ARGS) {
    vs_est<128, 0>(q, k, n, group, last_q, est_tiles, scale_log2, part, ml, col, diag, est_heads, n_est);
}
extern "C" __global__ void __launch_bounds__(128) vs_est_sum_d128(EST_ARGS) {
    vs_est<128, 1>(q, k, n, group, last_q, est_tiles, scale_log2, part, ml, col, diag, est_heads, n_est);
}
extern "C" __global__ void __launch_bounds__(128) vs_est_max_d64(EST_ARGS) {
    vs_est<64, 0>(q, k, n, group, last_q, est_tiles, scale_log2, part, ml, col, diag, est_heads, n_est);
}
extern "C" __global__ void __launch_bounds__(128) vs_est_sum_d64(EST_ARGS) {
    vs_est<64, 1>(q, k, n, group, last_q, est_tiles, scale_log2, part, ml, col, diag, est_heads, n_est);
}

// One warp per (head, padded row): combines the per-chunk (max, sum) into (max, 1 / sum).
extern "C" __global__ void vs_est_reduce(const float2* __restrict__ part, float2* __restrict__ ml, int rows,
                                         int nchunks) {
    const int row = blockIdx.x * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    float m = NEG_INF, l = 0.f;
    for (int c = lane; c < nchunks; c += 32) {
        const float2 p = part[(u64)row * nchunks + c];
        if (p.y > 0.f) {
            const float nm = fmaxf(m, p.x);
            l = l * exp2f(m - nm) + p.y * exp2f(p.x - nm);
            m = nm;
        }
    }
#pragma unroll
    for (int sh = 16; sh >= 1; sh >>= 1) {
        const float om = __shfl_xor_sync(0xffffffff, m, sh), ol = __shfl_xor_sync(0xffffffff, l, sh);
        const float nm = fmaxf(m, om);
        const float u = nm == NEG_INF ? 0.f : nm;
        l = l * exp2f(m - u) + ol * exp2f(om - u);
        m = nm;
    }
    if (lane == 0) ml[row] = make_float2(m, l > 0.f ? 1.f / l : 0.f);
}


// Sort key: forced items highest, then the score's bits (scores are >= 0, so bits order like values).
__device__ __forceinline__ u32 rank_key(const float* s, int i, int forced) {
    if (i < forced) return 0xffffffffu;
    const float x = s[i];
    return x > 0.f ? __float_as_uint(x) : 0u;
}

// A cluster of TK_CLUSTER CTAs of 1024 threads per (columns | diagonals, head): grid
// (2 * TK_CLUSTER, q_heads), cluster x = 0: columns (budget v, `forced_cols` forced), 1: diagonals
// (budget s, `forced_diags` forced). Budgets are per head, already clamped (v <= n, 1 <= s <= n).
// Writes cum[h][0..=n] (selected items before each index) and, for columns, col_list[h][0..v]
// (selected columns ascending). CTA r of the cluster takes items [r * seg, (r + 1) * seg): each radix
// pass histograms its own items, and every CTA sums the cluster's histograms through distributed
// shared memory and takes the same decision; the writes start at offsets from the counts of the
// CTAs before. (One CTA per (kind, head), 18 CTAs for SmolLM2's 9 heads, took 28 us at 16K: each
// pass's instructions in a row on one SM.)
#define TK_CLUSTER 8
extern "C" __global__ void __cluster_dims__(TK_CLUSTER, 1, 1) __launch_bounds__(1024)
    vs_topk(const float* __restrict__ col, const float* __restrict__ diag, const u32* __restrict__ budget_v,
            const u32* __restrict__ budget_s, int n, int forced_cols, int forced_diags, u32* __restrict__ col_cum,
            u32* __restrict__ diag_cum, u32* __restrict__ col_list) {
    __shared__ u32 hists[2][256];  // this CTA's histogram of a pass (two: pass p + 2 reuses p's)
    __shared__ u32 hist[256];      // the cluster's
    __shared__ u32 s_digit, s_rem, s_total, s_whole;
    __shared__ u32 s_counts[2];    // this CTA's items above and at the k-th key
    __shared__ u32 s_eq_prior, s_sel_prior;
    const int h = blockIdx.y, tid = threadIdx.x;
    const u32 rank = cluster_rank();
    const bool cols = blockIdx.x < TK_CLUSTER;
    const float* s = (cols ? col : diag) + (u64)h * n;
    const int forced = cols ? forced_cols : forced_diags;
    const u32 kk = cols ? budget_v[h] : budget_s[h];
    u32* cum = (cols ? col_cum : diag_cum) + (u64)h * (n + 1);
    int c0, c1;
    cluster_segment(n, TK_CLUSTER, rank, c0, c1);

    // Radix select, 8 bits at a time from the top: `prefix` ends as the k-th largest key masked by
    // `pmask`, `rem` the number of items equal to it (under the mask) that are selected (the
    // lowest-indexed ones). The passes stop early when the chosen digit's items are all selected.
    u32 prefix = 0, pmask = 0, rem = kk;
    const bool all = kk >= (u32)n, none = kk == 0, ranked = !all && !none;
    if (ranked) {
        for (int shift = 24, pass = 0; shift >= 0; shift -= 8, ++pass) {
            u32* mine = hists[pass & 1];
            if (tid < 256) mine[tid] = 0;
            __syncthreads();
            for (int base = c0; base < c1; base += 4096) {  // four keys per thread in flight
                u32 key[4];
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const int i = base + 1024 * u + tid;
                    key[u] = i < c1 ? rank_key(s, i, forced) : 0u;
                }
#pragma unroll
                for (int u = 0; u < 4; ++u)
                    hist_inc(mine, (key[u] >> shift) & 255, base + 1024 * u + tid < c1 && (key[u] & pmask) == prefix);
            }
            // every CTA's histogram is complete; the pass before's were read by all (its reads came
            // before this barrier in every CTA), so pass + 1 may zero them
            cluster_sync();
            if (tid < 256) hist[tid] = cluster_sum<TK_CLUSTER>(&mine[tid]);
            __syncthreads();
            if (tid < 32) {
                // the digit holding the rem-th largest key, walking down from 255: warp 0, lane l
                // holding bins 255 - 8l down to 248 - 8l (one thread walking all 256 bins cost ~4 µs
                // per pass)
                const int lane = tid;
                u32 lc, ic;
                double lm, im;
                bins_from_top(hist, nullptr, lc, lm, ic, im);
                const u32 reach = __ballot_sync(0xffffffffu, ic >= rem);
                const int L = reach ? __ffs(reach) - 1 : 31;  // none: digit 0, as the serial walk
                if (lane == L) {
                    u32 acc = ic - lc;
                    int d = 255 - 8 * lane;
                    for (int j = 0; j < 8; ++j, --d) {
                        if (d == 0 || acc + hist[d] >= rem) break;
                        acc += hist[d];
                    }
                    s_digit = (u32)d;
                    s_rem = rem - acc;
                    s_whole = acc + hist[d] == rem;
                }
            }
            __syncthreads();
            prefix |= s_digit << shift;
            pmask |= 255u << shift;
            rem = s_rem;
            const bool whole = s_whole;
            __syncthreads();
            if (whole) break;
        }
    }
    // Two coalesced passes over the warps' runs of this CTA's items: the counts above and at the k-th
    // key, then the writes, after the counts of the cluster's CTAs before this one.
    const int lane = tid & 31;
    const u32 lt = (1u << lane) - 1;
    int a, b;
    warp_run_1024(c0, c1, a, b);
    u32 gt = 0, eq = 0;
    if (ranked)
        for (int base = a; base < b; base += 128) {
            u32 key[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int i = base + 32 * u + lane;
                key[u] = i < b ? rank_key(s, i, forced) & pmask : 0u;
            }
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const bool in = base + 32 * u + lane < b;
                gt += __popc(__ballot_sync(0xffffffffu, in && key[u] > prefix));
                eq += __popc(__ballot_sync(0xffffffffu, in && key[u] == prefix));
            }
        }
    const u32 eq_in = warps_before_1024(eq, &s_total);
    if (tid == 0) s_counts[1] = s_total;
    warps_before_1024(gt, &s_total);
    if (tid == 0) s_counts[0] = s_total;
    cluster_sync();  // every CTA's counts are written
    if (tid == 0) {
        // items selected before this CTA's: all of them, or those above the k-th key and the first
        // `rem` at it in index order
        u32 eq_acc = 0, sel = 0;
        for (u32 r = 0; r < rank; ++r) {
            const u32 g = ld_cluster_u32(&s_counts[0], r), e = ld_cluster_u32(&s_counts[1], r);
            sel += g + min(e, rem > eq_acc ? rem - eq_acc : 0u);
            eq_acc += e;
        }
        s_eq_prior = eq_acc;
        s_sel_prior = all ? (u32)c0 : (ranked ? sel : 0u);
    }
    __syncthreads();
    const u32 eq_before = s_eq_prior + eq_in;
    const u32 eq_taken = min(eq, rem > eq_before ? rem - eq_before : 0u);
    const u32 mine = all ? (u32)(b - a) : (ranked ? gt + eq_taken : 0u);
    u32 sel_run = s_sel_prior + warps_before_1024(mine, &s_total), e_run = eq_before;
    if (rank == 0 && tid == 0) cum[0] = 0;
    for (int base0 = a; base0 < b; base0 += 128) {
        u32 keys[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int i = base0 + 32 * u + lane;
            keys[u] = ranked && i < b ? rank_key(s, i, forced) & pmask : 0u;
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int i = base0 + 32 * u + lane;
            const bool in = i < b;
            const u32 key = keys[u];
            const bool at = ranked && in && key == prefix;
            const u32 eb = __ballot_sync(0xffffffffu, at);
            const bool sel = in && (all || (ranked && (key > prefix || (at && e_run + __popc(eb & lt) < rem))));
            const u32 sb = __ballot_sync(0xffffffffu, sel);
            const u32 before = sel_run + __popc(sb & lt);
            if (sel && cols) col_list[(u64)h * n + before] = (u32)i;
            if (in) cum[i + 1] = before + sel;
            sel_run += __popc(sb);
            e_run += __popc(eb);
        }
    }
    cluster_sync();  // no CTA leaves while another may still read its counts
}

// Whether key block kb is computed for query block qb: some selected diagonal offset lies in
// [max(0, r0 - (k1 - 1)), r1 - 1 - k0] (`dcum` is the head's prefix count of selected diagonals).
__device__ __forceinline__ bool tile_selected(const u32* dcum, int n, int qb, int kb) {
    const int r0 = qb * 64, r1 = min(r0 + 64, n), k0 = kb * 64, k1 = min(k0 + 64, n);
    const int lo = max(0, r0 - (k1 - 1)), hi = r1 - 1 - k0;
    return dcum[hi + 1] > dcum[lo];
}

// Key-block selection by block diagonal. For a tile away from the sequence end (rows qb*64..+64 and
// keys kb*64..+64 both inside n) the offsets it meets are [max(0, dd*64 - 63), dd*64 + 63] with
// dd = qb - kb, so whether it is computed depends on dd alone. grid (q_heads), 1024 threads: writes the
// ascending list of such block diagonals, `bd_list[h][0..bd_cnt[h]]`. A tile that touches the end
// (only when n % 64 != 0) meets a subset of those offsets, so it can only drop out: vs_count and vs_fill
// re-test it exactly with tile_selected().
extern "C" __global__ void __launch_bounds__(1024) vs_bdiag(const u32* __restrict__ diag_cum, int n,
                                                            u32* __restrict__ bd_list, u32* __restrict__ bd_cnt) {
    __shared__ u32 s_total;
    const int h = blockIdx.x;
    const int q_blocks = (n + 63) / 64;
    const u32* dcum = diag_cum + (u64)h * (n + 1);
    auto sel = [&](int dd) {
        const int lo = max(0, dd * 64 - 63), hi = min(dd * 64 + 63, n - 1);
        return dcum[hi + 1] > dcum[lo];
    };
    const int per = (q_blocks + 1023) / 1024;
    const int a = min(q_blocks, (int)threadIdx.x * per), b = min(q_blocks, a + per);
    u32 cnt = 0;
    for (int dd = a; dd < b; ++dd) cnt += sel(dd);
    u32 w = block_scan_1024(cnt, &s_total);
    for (int dd = a; dd < b; ++dd)
        if (sel(dd)) bd_list[(u64)h * q_blocks + w++] = (u32)dd;
    if (threadIdx.x == 0) bd_cnt[h] = s_total;
}

// Whether key block kb of query block qb is computed, given that its block diagonal is listed.
__device__ __forceinline__ bool listed_tile_selected(const u32* dcum, int n, int qb, int kb) {
    const int q_blocks = (n + 63) / 64;
    const bool edge = (n & 63) != 0 && (qb == q_blocks - 1 || kb == q_blocks - 1);
    return !edge || tile_selected(dcum, n, qb, kb);
}

// One warp per (head, query block): counts of key blocks and gathered columns.
extern "C" __global__ void vs_count(const u32* __restrict__ col_cum, const u32* __restrict__ diag_cum,
                                    const u32* __restrict__ bd_list, const u32* __restrict__ bd_cnt, int n,
                                    int q_heads, u32* __restrict__ cnt_blk, u32* __restrict__ cnt_col) {
    const int q_blocks = (n + 63) / 64;
    const int e = blockIdx.x * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (e >= q_heads * q_blocks) return;
    const int h = e / q_blocks, qb = e % q_blocks;
    const u32* dcum = diag_cum + (u64)h * (n + 1);
    const u32* ccum = col_cum + (u64)h * (n + 1);
    const u32* list = bd_list + (u64)h * q_blocks;
    const int nl = (int)bd_cnt[h];
    const int last = min(qb * 64 + 64, n) - 1;
    u32 nb = 0, inside = 0;
    for (int x = lane; x < nl; x += 32) {
        const int dd = (int)list[x];
        if (dd > qb) break;  // ascending
        const int kb = qb - dd;
        if (listed_tile_selected(dcum, n, qb, kb)) {
            ++nb;
            inside += ccum[min(kb * 64 + 64, last + 1)] - ccum[kb * 64];
        }
    }
#pragma unroll
    for (int sh = 16; sh >= 1; sh >>= 1) {
        nb += __shfl_xor_sync(0xffffffff, nb, sh);
        inside += __shfl_xor_sync(0xffffffff, inside, sh);
    }
    if (lane == 0) {
        cnt_blk[e] = nb;
        cnt_col[e] = ccum[last + 1] - inside;
    }
}

// grid 2 (block counts, column counts), 1024 threads: off[0..=m] = exclusive scan of cnt[0..m]; the two
// totals also go to totals[0..2] (one read back for both).
extern "C" __global__ void __launch_bounds__(1024) vs_scan(const u32* __restrict__ cnt_blk, const u32* __restrict__ cnt_col,
                                                           int m, u32* __restrict__ blk_off, u32* __restrict__ col_off,
                                                           u32* __restrict__ totals) {
    __shared__ u32 s_total;
    const u32* cnt = blockIdx.x == 0 ? cnt_blk : cnt_col;
    u32* off = blockIdx.x == 0 ? blk_off : col_off;
    const int lane = threadIdx.x & 31;
    int a, b;
    warp_run_1024(m, a, b);
    u32 sum = 0;
    for (int i = a + lane; i < b; i += 32) sum += cnt[i];
#pragma unroll
    for (int sh = 16; sh >= 1; sh >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, sh);
    u32 run = warps_before_1024(sum, &s_total);
    for (int base = a; base < b; base += 32) {
        const int i = base + lane;
        const u32 c = i < b ? cnt[i] : 0u;
        u32 inc = c;
#pragma unroll
        for (int sh = 1; sh < 32; sh <<= 1) {
            const u32 y = __shfl_up_sync(0xffffffffu, inc, sh);
            if (lane >= sh) inc += y;
        }
        if (i < b) off[i] = run + inc - c;
        run += __shfl_sync(0xffffffffu, inc, 31);
    }
    if (threadIdx.x == 0) {
        off[m] = s_total;
        totals[blockIdx.x] = s_total;
    }
}

// One CTA of FILL_THREADS per (head, query block): the sorted key blocks (warp 0), then the gathered
// columns, i.e. the head's selected columns before the block's end that lie outside its computed
// tiles. The columns go FILL_THREADS * 4 candidates per round, four per thread with their loads in
// flight together, tested against the block's tiles in a shared bitmap (set by warp 0 as it writes
// them) and written in candidate order at offsets from a scan of the warps' counts. (A warp per entry,
// testing each candidate's tile in `diag_cum`, took 32 µs per layer at 16K on SmolLM2's plan: the
// last query blocks' thousands of candidates, a few loads in flight per lane, set its time.)
// Dynamic shared memory: (q_blocks + 31) / 32 words.
extern "C" __global__ void __launch_bounds__(FILL_THREADS)
    vs_fill(const u32* __restrict__ col_cum, const u32* __restrict__ diag_cum, const u32* __restrict__ col_list,
            const u32* __restrict__ bd_list, const u32* __restrict__ bd_cnt, int n, int q_heads,
            const u32* __restrict__ blk_off, const u32* __restrict__ col_off, u32* __restrict__ blk_idx,
            u32* __restrict__ col_idx) {
    extern __shared__ u32 tile_bits[];        // key blocks 0..qb computed for this query block
    __shared__ u32 kept[4 * FILL_THREADS / 32];  // a round's kept candidates per (slot u, warp)
    const int q_blocks = (n + 63) / 64;
    const int e = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (e >= q_heads * q_blocks) return;
    const int h = e / q_blocks, qb = e % q_blocks;
    const u32* dcum = diag_cum + (u64)h * (n + 1);
    const u32* ccum = col_cum + (u64)h * (n + 1);
    const u32* list = col_list + (u64)h * n;
    const u32* bdl = bd_list + (u64)h * q_blocks;
    const int last = min(qb * 64 + 64, n) - 1;
    const u32 lt = (1u << lane) - 1;
    for (int i = tid; i <= qb / 32; i += FILL_THREADS) tile_bits[i] = 0;
    __syncthreads();
    if (warp == 0) {
        // listed block diagonals dd <= qb, walked from the largest (smallest kb) down: kb ascending
        int hi_x = (int)bd_cnt[h];
        {
            int lo = 0, hi = hi_x;  // first index with dd > qb
            while (lo < hi) {
                const int mid = (lo + hi) >> 1;
                if ((int)bdl[mid] <= qb) lo = mid + 1;
                else hi = mid;
            }
            hi_x = lo;
        }
        u32 w = blk_off[e];
        for (int base = 0; base < hi_x; base += 32) {
            const int x = hi_x - 1 - (base + lane);
            bool sel = false;
            int kb = 0;
            if (x >= 0) {
                kb = qb - (int)bdl[x];
                sel = listed_tile_selected(dcum, n, qb, kb);
            }
            const u32 bal = __ballot_sync(0xffffffff, sel);
            if (sel) {
                blk_idx[w + __popc(bal & lt)] = (u32)kb;
                atomicOr(&tile_bits[kb >> 5], 1u << (kb & 31));
            }
            w += __popc(bal);
        }
    }
    __syncthreads();
    // the candidates, in rounds; slot u of a round holds candidates base + u * FILL_THREADS + tid
    const int ncand = (int)ccum[last + 1];
    u32 w = col_off[e];
    for (int base = 0; base < ncand; base += 4 * FILL_THREADS) {
        u32 j[4], bal[4];
        bool keep[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int x = base + u * FILL_THREADS + tid;
            j[u] = x < ncand ? list[x] : 0u;
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const u32 kb = j[u] / 64;
            keep[u] = base + u * FILL_THREADS + tid < ncand && !((tile_bits[kb >> 5] >> (kb & 31)) & 1u);
            bal[u] = __ballot_sync(0xffffffff, keep[u]);
        }
        if (lane == 0) {
#pragma unroll
            for (int u = 0; u < 4; ++u) kept[u * (FILL_THREADS / 32) + warp] = __popc(bal[u]);
        }
        __syncthreads();
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            u32 slot;
            const u32 before = warp_sums_before<FILL_THREADS / 32>(kept + u * (FILL_THREADS / 32), warp, slot);
            if (keep[u]) col_idx[w + before + __popc(bal[u] & lt)] = j[u];
            w += slot;  // the next slot starts after this slot's warps
        }
        __syncthreads();  // `kept` is rewritten by the next round
    }
}

// Merging per-head indexes from up to four sources (e.g. the vertical-slash, block-sparse and
// token-select builders and a host upload) into one: entry e = h * q_blocks + qb takes the lists of head src_head[h] in
// source src_id[h]. ix_merge_count writes the list sizes (then vs_scan gives the offsets); ix_merge_copy
// copies, one span per head.
struct IxSrc {
    const u32* blk_off;
    const u32* blk_idx;
    const u32* col_off;
    const u32* col_idx;
};

__device__ __forceinline__ IxSrc ix_pick(int s, IxSrc a, IxSrc b, IxSrc c, IxSrc d) {
    return s == 0 ? a : (s == 1 ? b : (s == 2 ? c : d));
}

#define IX_SRC_ARGS                                                                                           \
    const u32 *bo0, const u32 *bi0, const u32 *co0, const u32 *ci0, const u32 *bo1, const u32 *bi1,           \
        const u32 *co1, const u32 *ci1, const u32 *bo2, const u32 *bi2, const u32 *co2, const u32 *ci2,       \
        const u32 *bo3, const u32 *bi3, const u32 *co3, const u32 *ci3
#define IX_SRCS                                                                                               \
    IxSrc{bo0, bi0, co0, ci0}, IxSrc{bo1, bi1, co1, ci1}, IxSrc{bo2, bi2, co2, ci2}, IxSrc{bo3, bi3, co3, ci3}

// src_over[src_head[h]], unless 0xffffffff, replaces src_id[h]: a choice made on the device for the
// head whose lists h takes (e.g. a query-adaptive head's branch, which the heads sharing its index
// follow).
__device__ __forceinline__ int ix_source(const u32* src_id, const u32* src_over, const u32* src_head, int h) {
    const u32 o = src_over[src_head[h]];
    return (int)(o != 0xffffffffu ? o : src_id[h]);
}

extern "C" __global__ void ix_merge_count(IX_SRC_ARGS, const u32* __restrict__ src_id,
                                          const u32* __restrict__ src_over, const u32* __restrict__ src_head,
                                          int q_heads, int q_blocks, u32* __restrict__ cnt_blk,
                                          u32* __restrict__ cnt_col) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= q_heads * q_blocks) return;
    const int h = e / q_blocks, qb = e % q_blocks;
    const IxSrc s = ix_pick(ix_source(src_id, src_over, src_head, h), IX_SRCS);
    const u32 f = src_head[h] * (u32)q_blocks + (u32)qb;
    cnt_blk[e] = s.blk_off[f + 1] - s.blk_off[f];
    cnt_col[e] = s.col_off[f + 1] - s.col_off[f];
}

// A head's lists are contiguous in its source (CSR in query-block order) and in the merged index
// (same sizes, same order), so the merged lists are the heads' spans end to end. One CTA per run of
// MC_RUN merged entries (the first blk_ctas CTAs over the key blocks, the rest over the columns) copies
// the part of each head's span that falls in its run (usually one head, coalesced).
#define MC_RUN 4096
extern "C" __global__ void __launch_bounds__(256) ix_merge_copy(IX_SRC_ARGS, const u32* __restrict__ src_id,
                                         const u32* __restrict__ src_over, const u32* __restrict__ src_head,
                                         int q_heads, int q_blocks, const u32* __restrict__ blk_off,
                                         const u32* __restrict__ col_off, u32* __restrict__ blk_idx,
                                         u32* __restrict__ col_idx, int blk_ctas) {
    const bool blk = (int)blockIdx.x < blk_ctas;
    const u32 r0 = (blk ? blockIdx.x : blockIdx.x - blk_ctas) * MC_RUN;
    const u32* off = blk ? blk_off : col_off;
    u32* dst = blk ? blk_idx : col_idx;
    const u32 r1 = min(r0 + MC_RUN, off[q_heads * q_blocks]);
    for (int h = 0; h < q_heads; ++h) {
        const u32 d0 = off[h * q_blocks], d1 = off[(h + 1) * q_blocks];
        if (d1 <= r0) continue;
        if (d0 >= r1) break;
        const IxSrc s = ix_pick(ix_source(src_id, src_over, src_head, h), IX_SRCS);
        const u32 f0 = src_head[h] * (u32)q_blocks;
        const u32* src = blk ? s.blk_idx + s.blk_off[f0] : s.col_idx + s.col_off[f0];  // the head's span
        const u32 a = max(r0, d0), b = min(r1, d1);
        strided_copy(dst + a, src + (a - d0), b - a, threadIdx.x, blockDim.x);
    }
}

// The column lists of a group of G (2 or 3) neighbouring query blocks as one list, for the
// warp-specialized attention kernels (one CTA computes the G blocks and then loads each column tile
// once instead of once per block). Entries of the union, ascending, carry their blocks in the top G
// bits (block Gp + i in bit 32 - G + i) over the token (below 2^(32 - G) - 1, checked by the host).
// The union of group p of head h goes from offset col_off[h * q_blocks + Gp] on (the lists' own
// space, so no sizes are read back); its length to out_len[h * q_groups + p]. Lists must be
// ascending without repeats (HeadIndex's).
//
// One CTA of 256 threads per group, on one of two paths chosen per group by what it costs
// (union_group):
// - bitmaps, for groups whose tokens all lie below UB_WORDS * 32 and whose entries are at least
//   UB_DENSE times their 32-token words (e.g. SmolLM2's column-heavy plan up to 32K): every entry
//   sets its bit in its block's bitmap in shared memory (reads coalesced); then each warp takes
//   UB_WPW consecutive words, counts the tokens of the union (the OR of the bitmaps), a block scan
//   gives its offset, and it writes its tokens word by word, skipping empty words, each lane one
//   bit (coalesced stores), with the bits of the blocks whose bitmap holds it.
// - the merge path, for the others (sparse lists over a long range, e.g. 1,000 columns at 128K, and
//   groups reaching past 32K tokens): two lists at a time, for three blocks 0 and 1 into the scratch
//   list pass_idx (same offsets; bits 29 and 30), then that list and block 2 (bit 31); tokens
//   compare under the low 32 - G bits. Each merge runs in tiles of UN_TILE merged positions (both
//   copies of a shared entry counted): the next UN_TILE entries of each list are staged in shared
//   memory (coalesced), each thread finds the start of its UN_PER positions by a binary search on its
//   diagonal (ties take the first list's copy first), counts the entries it emits (a shared entry
//   once, with the first list's copy, tagged with both), a block scan gives the offsets, and the
//   tile's output is staged and written out coalesced. (A warp per pair merging from global memory,
//   each lane its own segment, took 7.8 ms at 128K: every load of the warp touched 32 lines.)
// Measured in docs/perf.md ("Seventeenth session"), where bitmaps for every group (over longer
// ranges in chunks) and the two paths as two launches were tried too.
#define UN_THREADS 256                        // threads per group (CTA), both paths
#define UB_WORDS 1024                         // bitmap words per block: tokens below UB_WORDS * 32
#define UB_WPW (UB_WORDS / (UN_THREADS / 32))  // words per warp
#define UB_DENSE 2  // bitmaps when a group's entries are at least this many times its words
#define UN_PER 8    // merged positions per thread and tile
#define UN_TILE (UN_THREADS * UN_PER)

// A group's lists (absent blocks' empty), one past its largest token, and its path.
struct UnionGroup {
    const u32* list[3];
    int len[3];
    u32 end;
    bool bitmap;
};

__device__ __forceinline__ UnionGroup union_group(const u32* __restrict__ col_off, const u32* __restrict__ col_idx,
                                                  int q_blocks, int group, int p, int e) {
    UnionGroup g;
    g.end = 0;
    int entries = 0;
#pragma unroll
    for (int i = 0; i < 3; ++i) {
        const bool real = i < group && group * p + i < q_blocks;
        g.len[i] = real ? (int)(col_off[e + i + 1] - col_off[e + i]) : 0;
        g.list[i] = col_idx + (real ? col_off[e + i] : 0u);
        if (g.len[i] > 0) g.end = max(g.end, g.list[i][g.len[i] - 1] + 1);
        entries += g.len[i];
    }
    const u32 words = (g.end + 31) >> 5;
    g.bitmap = words <= UB_WORDS && (u32)entries >= UB_DENSE * words;
    return g;
}

// The number of a's entries among the first d merged positions of a[0..la) and b[0..lb) (shared),
// tokens compared under `mask`.
__device__ __forceinline__ int un_split(const u32* a, int la, const u32* b, int lb, int d, u32 mask) {
    int lo = max(0, d - lb), hi = min(d, la);
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if ((a[mid] & mask) <= (b[d - 1 - mid] & mask)) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// The two paths' shared memory (a CTA takes one path).
union UnionSmem {
    struct {
        u32 sa[UN_TILE], sb[UN_TILE + 1], so[UN_TILE];
        int warp_sum[UN_THREADS / 32];
        int next_i;
    } m;
    struct {
        u32 bm[3][UB_WORDS];
        int warp_sum[UN_THREADS / 32];
    } b;
};

// The merge path of ix_group_union; returns the union's length.
__device__ __forceinline__ int union_merge(UnionSmem& sm, const UnionGroup& g, int group, int token_bits,
                                          u32* __restrict__ pass, u32* __restrict__ out) {
    const u32 END_TOKEN = 0xffffffffu;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u32 mask = (1u << token_bits) - 1;
    auto tag = [&](int i) { return 1u << (token_bits + i); };
    // One pass: the union of ga[0..la) (entries tagged a_tag, or already tagged) and gb[0..lb) (tagged
    // b_tag) into out; returns its length. Ends with a __syncthreads, after which out is visible to
    // the whole CTA.
    auto merge_lists = [&](const u32* ga, int la, const u32* gb, int lb, u32* out, u32 a_tag, u32 b_tag) {
        const int total = la + lb;
        int i0 = 0, j0 = 0, written = 0;
        for (int d0 = 0; d0 < total; d0 += UN_TILE) {
            const int n_tile = min(UN_TILE, total - d0);
            // stage the next entries of each list (past the end: END_TOKEN); b one further, for the check
            // whether the tile's last a entry is shared; a's entry before the tile decides whether the
            // tile's first b entry was already written
            for (int k = tid; k < UN_TILE; k += UN_THREADS) sm.m.sa[k] = i0 + k < la ? ga[i0 + k] : END_TOKEN;
            for (int k = tid; k <= UN_TILE; k += UN_THREADS) sm.m.sb[k] = j0 + k < lb ? gb[j0 + k] : END_TOKEN;
            const u32 a_before = (i0 > 0 ? ga[i0 - 1] : END_TOKEN) & mask;
            __syncthreads();
            const int ta = min(UN_TILE, la - i0), tb = min(UN_TILE, lb - j0);  // staged real entries
            const int d = min(tid * UN_PER, n_tile), d_end = min(d + UN_PER, n_tile);
            const int i_first = un_split(sm.m.sa, ta, sm.m.sb, tb, d, mask);
            // the thread's positions d..d_end of the merge: run twice, to count and then to write at `dst`
            auto merge = [&](u32* dst) {
                int i = i_first, j = d - i_first, cnt = 0;
                u32 last_a = i > 0 ? sm.m.sa[i - 1] & mask : a_before;
                for (int t = d; t < d_end; ++t) {
                    const u32 xt = sm.m.sa[i], x = xt & mask, y = sm.m.sb[j] & mask;
                    if (x <= y) {
                        if (dst) dst[cnt] = xt | a_tag | (x == y ? b_tag : 0u);
                        ++cnt;
                        last_a = x;
                        ++i;
                    } else {
                        if (y != last_a) {
                            if (dst) dst[cnt] = y | b_tag;
                            ++cnt;
                        }
                        ++j;
                    }
                }
                return make_int2(cnt, i);
            };
            const int2 counted = merge(nullptr);
            const int cnt = counted.x, i = counted.y;
            // exclusive scan of cnt over the CTA
            int inc = cnt;
#pragma unroll
            for (int sh = 1; sh < 32; sh <<= 1) {
                const int v = __shfl_up_sync(0xffffffff, inc, sh);
                if (lane >= sh) inc += v;
            }
            if (lane == 31) sm.m.warp_sum[warp] = inc;
            if (tid == UN_THREADS - 1) sm.m.next_i = i;  // the last thread's segment ends the tile
            __syncthreads();
            int tile_len;
            const int before = warp_sums_before<UN_THREADS / 32>(sm.m.warp_sum, warp, tile_len);
            merge(sm.m.so + before + inc - cnt);
            __syncthreads();
            for (int k = tid; k < tile_len; k += UN_THREADS) out[written + k] = sm.m.so[k];
            written += tile_len;
            const int di = sm.m.next_i;
            i0 += di;
            j0 += n_tile - di;
            __syncthreads();  // before the next tile overwrites the staged lists and next_i
        }
        return written;
    };
    if (group == 2) return merge_lists(g.list[0], g.len[0], g.list[1], g.len[1], out, tag(0), tag(1));
    // blocks 0 and 1 into pass, then that union and block 2
    const int l01 = merge_lists(g.list[0], g.len[0], g.list[1], g.len[1], pass, tag(0), tag(1));
    return merge_lists(pass, l01, g.list[2], g.len[2], out, 0u, tag(2));
}

// The bitmap path of ix_group_union; returns the union's length.
__device__ __forceinline__ int union_bitmap(UnionSmem& sm, const UnionGroup& g, int token_bits,
                                           u32* __restrict__ out) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int words = (int)((g.end + 31) >> 5);
#pragma unroll
    for (int i = 0; i < 3; ++i)
        for (int k = tid; k < words; k += UN_THREADS) sm.b.bm[i][k] = 0u;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 3; ++i) {
        const u32* l = g.list[i];
#pragma unroll 4
        for (int j = tid; j < g.len[i]; j += UN_THREADS) {
            const u32 t = l[j];
            atomicOr(&sm.b.bm[i][t >> 5], 1u << (t & 31));
        }
    }
    __syncthreads();
    // warp `warp` writes words [w0, w1): its count, a block scan for its offset, then word by word
    // each lane its bit, so that every store of the warp is contiguous; words without a token are
    // skipped (lane l holds word w0 + 32c + l of each pass c, a ballot finds the others)
    const int w0 = warp * UB_WPW, w1 = min(words, w0 + UB_WPW);
    u32 word[UB_WPW / 32];
    int cnt = 0;
#pragma unroll
    for (int c = 0; c < UB_WPW / 32; ++c) {
        const int k = w0 + 32 * c + lane;
        word[c] = k < w1 ? sm.b.bm[0][k] | sm.b.bm[1][k] | sm.b.bm[2][k] : 0u;
        cnt += __popc(word[c]);
    }
#pragma unroll
    for (int sh = 16; sh > 0; sh >>= 1) cnt += __shfl_xor_sync(0xffffffffu, cnt, sh);
    if (lane == 0) sm.b.warp_sum[warp] = cnt;
    __syncthreads();
    int total;
    const int pre = warp_sums_before<UN_THREADS / 32>(sm.b.warp_sum, warp, total);
    u32* dst = out + pre;
    const u32 below = (1u << lane) - 1;
#pragma unroll
    for (int c = 0; c < UB_WPW / 32; ++c) {
        for (u32 nz = __ballot_sync(0xffffffffu, word[c] != 0u); nz; nz &= nz - 1) {
            const int j = __ffs(nz) - 1, k = w0 + 32 * c + j;  // the next word with a token
            const u32 x = __shfl_sync(0xffffffffu, word[c], j);
            // (for groups of two, bm[2] is empty: the clamped shift only keeps it defined)
            if (x >> lane & 1u)
                dst[__popc(x & below)] = ((u32)k * 32u + (u32)lane) | (sm.b.bm[0][k] >> lane & 1u) << token_bits |
                                         (sm.b.bm[1][k] >> lane & 1u) << (token_bits + 1) |
                                         (sm.b.bm[2][k] >> lane & 1u) << min(token_bits + 2, 31);
            dst += __popc(x);
        }
    }
    return total;
}

extern "C" __global__ void __launch_bounds__(UN_THREADS)
    ix_group_union(const u32* __restrict__ col_off, const u32* __restrict__ col_idx, int q_heads, int q_blocks,
                   int group, u32* __restrict__ pass_idx, u32* __restrict__ out_idx, u32* __restrict__ out_len) {
    __shared__ UnionSmem sm;
    const int q_groups = (q_blocks + group - 1) / group;
    const int w = blockIdx.x;
    if (w >= q_heads * q_groups) return;  // w is the same in the whole CTA
    const int p = w % q_groups;
    const int e = (w / q_groups) * q_blocks + group * p;  // the group's first block
    const UnionGroup g = union_group(col_off, col_idx, q_blocks, group, p, e);
    const int token_bits = 32 - group;
    const int len = g.bitmap ? union_bitmap(sm, g, token_bits, out_idx + col_off[e])
                             : union_merge(sm, g, group, token_bits, pass_idx + col_off[e], out_idx + col_off[e]);
    if (threadIdx.x == 0) out_len[w] = (u32)len;
}
