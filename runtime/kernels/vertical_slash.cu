// Vertical-slash index building on the GPU, all heads of a layer per launch. Same selection as the CPU
// `runtime::pattern::vertical_slash` (see its module docs); stages, in launch order:
//
// 1. vs_est<0>: scores of the last L queries against all keys (mma.sync), per (head, row tile of 64
//    of the last L rows, chunk of est_tiles * 64 keys, est_tiles <= 8 chosen by the host so that small
//    layers still fill the GPU): running max and sum of exp2 per row -> `part`.
// 2. vs_est_reduce: per (head, row): combines the partials into (max, 1 / sum) -> `ml`.
// 3. vs_est<1>: recomputes the scores, writes p = softmax into a shared 64x64 tile, sums it per key
//    column (`col`) and per diagonal offset i - j (`diag`), then global f32 atomics (both zeroed before).
// K tiles are double-buffered with cp.async; CTAs of the heads of one KV group are adjacent in the grid,
// so they read the same K chunk through L2.
// 4. vs_topk: per (head, columns | diagonals): radix select of the top-k (forced items first, then
//    descending score, ties to the lower index), writes inclusive prefix counts `cum[h][0..=n]` of the
//    selected items and, for columns, the sorted list of selected columns.
// 5. vs_bdiag: per head, the block diagonals qb - kb whose tiles a selected diagonal touches;
//    vs_count: per (head, query block), one warp: the number of key blocks (tiles touched by a selected
//    diagonal, walked through that list, not over all causal key blocks) and of gathered columns
//    (selected columns <= the block's last row, outside those tiles).
// 6. vs_scan: exclusive scan of both count arrays -> `blk_off`, `col_off` (the flattened CSR offsets).
// 7. vs_fill: per (head, query block), one warp: writes the sorted key blocks and columns.
//
// Scores: q . k in f32 from bf16 products (exact) with tensor-core accumulation order; softmax in f32.
// The CPU reference uses f32 dots and f64 softmax, so selections can differ only at near-ties.


template <int D, int PASS>
__device__ __forceinline__ void vs_est(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, int n,
                                       int q_heads, int group, int last_q, int est_tiles, float scale_log2,
                                       float2* __restrict__ part, const float2* __restrict__ ml,
                                       float* __restrict__ col, float* __restrict__ diag) {
    constexpr int CPR = D / 8, ROWS_PER_PASS = 128 / CPR, PASSES = 64 / ROWS_PER_PASS;
    constexpr int TILE_BYTES = 64 * D * 2;
    constexpr int PLD = 65;  // row stride (floats) of the P tile: conflict-free column and diagonal walks
    extern __shared__ __align__(128) unsigned char smem[];
    const u32 sQ = smem_u32(smem), sK = sQ + TILE_BYTES;  // K: 2 stages
    float* pt = (float*)(smem + 3 * TILE_BYTES);          // [64][PLD] probabilities (PASS 1)

    const int h = blockIdx.x % q_heads, chunk = blockIdx.x / q_heads, rt = blockIdx.y;
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
    const bf16_t *__restrict__ q, const bf16_t *__restrict__ k, int n, int q_heads, int group,     \
        int last_q, int est_tiles, float scale_log2, float2 *__restrict__ part, const float2 *__restrict__ ml,    \
        float *__restrict__ col, float *__restrict__ diag

extern "C" __global__ void __launch_bounds__(128) vs_est_max_d128(EST_ARGS) {
    vs_est<128, 0>(q, k, n, q_heads, group, last_q, est_tiles, scale_log2, part, ml, col, diag);
}
extern "C" __global__ void __launch_bounds__(128) vs_est_sum_d128(EST_ARGS) {
    vs_est<128, 1>(q, k, n, q_heads, group, last_q, est_tiles, scale_log2, part, ml, col, diag);
}
extern "C" __global__ void __launch_bounds__(128) vs_est_max_d64(EST_ARGS) {
    vs_est<64, 0>(q, k, n, q_heads, group, last_q, est_tiles, scale_log2, part, ml, col, diag);
}
extern "C" __global__ void __launch_bounds__(128) vs_est_sum_d64(EST_ARGS) {
    vs_est<64, 1>(q, k, n, q_heads, group, last_q, est_tiles, scale_log2, part, ml, col, diag);
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

// grid (2, q_heads), 1024 threads. blockIdx.x == 0: columns (budget v, `forced_cols` forced),
// 1: diagonals (budget s, `forced_diags` forced). Budgets are per head, already clamped
// (v <= n, 1 <= s <= n). Writes cum[h][0..=n] (selected items before each index) and, for columns,
// col_list[h][0..v] (selected columns ascending).
extern "C" __global__ void __launch_bounds__(1024)
    vs_topk(const float* __restrict__ col, const float* __restrict__ diag, const u32* __restrict__ budget_v,
            const u32* __restrict__ budget_s, int n, int forced_cols, int forced_diags, u32* __restrict__ col_cum,
            u32* __restrict__ diag_cum, u32* __restrict__ col_list) {
    __shared__ u32 hist[256];
    __shared__ u32 s_digit, s_rem, s_total, s_whole;
    const int h = blockIdx.y, tid = threadIdx.x;
    const bool cols = blockIdx.x == 0;
    const float* s = (cols ? col : diag) + (u64)h * n;
    const int forced = cols ? forced_cols : forced_diags;
    const u32 kk = cols ? budget_v[h] : budget_s[h];
    u32* cum = (cols ? col_cum : diag_cum) + (u64)h * (n + 1);

    // Radix select, 8 bits at a time from the top: `prefix` ends as the k-th largest key masked by
    // `pmask`, `rem` the number of items equal to it (under the mask) that are selected (the
    // lowest-indexed ones). The passes stop early when the chosen digit's items are all selected.
    u32 prefix = 0, pmask = 0, rem = kk;
    const bool all = kk >= (u32)n, none = kk == 0, ranked = !all && !none;
    if (ranked) {
        for (int shift = 24; shift >= 0; shift -= 8) {
            if (tid < 256) hist[tid] = 0;
            __syncthreads();
            for (int base = 0; base < n; base += 4096) {  // four keys per thread in flight
                u32 key[4];
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const int i = base + 1024 * u + tid;
                    key[u] = i < n ? rank_key(s, i, forced) : 0u;
                }
#pragma unroll
                for (int u = 0; u < 4; ++u)
                    hist_inc(hist, (key[u] >> shift) & 255, base + 1024 * u + tid < n && (key[u] & pmask) == prefix);
            }
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
    // Two coalesced passes over the warps' runs: the counts above and at the k-th key, then the writes.
    const int lane = tid & 31;
    const u32 lt = (1u << lane) - 1;
    int a, b;
    warp_run_1024(n, a, b);
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
    const u32 eq_before = warps_before_1024(eq, &s_total);
    const u32 eq_taken = min(eq, rem > eq_before ? rem - eq_before : 0u);
    const u32 mine = all ? (u32)(b - a) : (ranked ? gt + eq_taken : 0u);
    u32 run = warps_before_1024(mine, &s_total), e_run = eq_before;
    if (tid == 0) cum[0] = 0;
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
            const u32 before = run + __popc(sb & lt);
            if (sel && cols) col_list[(u64)h * n + before] = (u32)i;
            if (in) cum[i + 1] = before + sel;
            run += __popc(sb);
            e_run += __popc(eb);
        }
    }
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

// One warp per (head, query block): writes the sorted key blocks and gathered columns.
extern "C" __global__ void vs_fill(const u32* __restrict__ col_cum, const u32* __restrict__ diag_cum,
                                   const u32* __restrict__ col_list, const u32* __restrict__ bd_list,
                                   const u32* __restrict__ bd_cnt, int n, int q_heads,
                                   const u32* __restrict__ blk_off, const u32* __restrict__ col_off,
                                   u32* __restrict__ blk_idx, u32* __restrict__ col_idx) {
    const int q_blocks = (n + 63) / 64;
    const int e = blockIdx.x * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (e >= q_heads * q_blocks) return;
    const int h = e / q_blocks, qb = e % q_blocks;
    const u32* dcum = diag_cum + (u64)h * (n + 1);
    const u32* ccum = col_cum + (u64)h * (n + 1);
    const u32* list = col_list + (u64)h * n;
    const u32* bdl = bd_list + (u64)h * q_blocks;
    const int last = min(qb * 64 + 64, n) - 1;
    const u32 lt = (1u << lane) - 1;
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
        if (sel) blk_idx[w + __popc(bal & lt)] = (u32)kb;
        w += __popc(bal);
    }
    // candidates 128 at a time, four per lane, so that their loads are in flight together
    const int ncand = (int)ccum[last + 1];
    w = col_off[e];
    for (int base = 0; base < ncand; base += 128) {
        u32 j[4];
        bool keep[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int x = base + 32 * u + lane;
            j[u] = x < ncand ? list[x] : 0u;
        }
#pragma unroll
        for (int u = 0; u < 4; ++u)
            keep[u] = base + 32 * u + lane < ncand && !tile_selected(dcum, n, qb, (int)(j[u] / 64));
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const u32 bal = __ballot_sync(0xffffffff, keep[u]);
            if (keep[u]) col_idx[w + __popc(bal & lt)] = j[u];
            w += __popc(bal);
        }
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
// (same sizes, same order), so each head is one span copied: grid (CTAs per head, q_heads), the CTAs
// of a head striding over its key blocks and its columns.
extern "C" __global__ void __launch_bounds__(256) ix_merge_copy(IX_SRC_ARGS, const u32* __restrict__ src_id,
                                         const u32* __restrict__ src_over, const u32* __restrict__ src_head,
                                         int q_heads, int q_blocks, const u32* __restrict__ blk_off,
                                         const u32* __restrict__ col_off, u32* __restrict__ blk_idx,
                                         u32* __restrict__ col_idx) {
    const int h = blockIdx.y;
    if (h >= q_heads) return;
    const IxSrc s = ix_pick(ix_source(src_id, src_over, src_head, h), IX_SRCS);
    const u32 f0 = src_head[h] * (u32)q_blocks, f1 = f0 + (u32)q_blocks, e0 = (u32)h * (u32)q_blocks;
    const u32 stride = gridDim.x * blockDim.x, first = blockIdx.x * blockDim.x + threadIdx.x;
    auto span = [&](u32* dst, const u32* src, u32 count) {
        u32 i = first;
        for (; i + 3 * stride < count; i += 4 * stride) {
            const u32 x0 = src[i], x1 = src[i + stride], x2 = src[i + 2 * stride], x3 = src[i + 3 * stride];
            dst[i] = x0;
            dst[i + stride] = x1;
            dst[i + 2 * stride] = x2;
            dst[i + 3 * stride] = x3;
        }
        for (; i < count; i += stride) dst[i] = src[i];
    };
    span(blk_idx + blk_off[e0], s.blk_idx + s.blk_off[f0], s.blk_off[f1] - s.blk_off[f0]);
    span(col_idx + col_off[e0], s.col_idx + s.col_off[f0], s.col_off[f1] - s.col_off[f0]);
}

// The column lists of a group of G (2 or 3) neighbouring query blocks as one list, for the
// warp-specialized attention kernels (one CTA computes the G blocks and then loads each column tile
// once instead of once per block). Entries of the union, ascending, carry their blocks in the top G
// bits (block Gp + i in bit 32 - G + i) over the token (below 2^(32 - G) - 1, checked by the host).
// The union of group p of head h goes from offset col_off[h * q_blocks + Gp] on (the lists' own
// space, so no sizes are read back); its length to out_len[h * q_groups + p]. Lists must be
// ascending without repeats (HeadIndex's).
//
// One CTA of UB_THREADS per group, through bitmaps: the tokens [0, end), end one past the group's
// largest entry, are taken in chunks of UB_CHUNK tokens (one bitmap per block in shared memory). A chunk's
// entries of each list follow the entries before it (the lists are ascending): the CTA reads them in
// rounds of UB_LOADS coalesced entries per thread and list, all lists at once, each entry below the
// chunk's end setting its bit in its block's bitmap in shared memory, until a round meets an entry
// past the chunk (or the list's end). Then each warp takes UB_WPW consecutive words, counts the tokens
// of the union (the OR of the bitmaps), a block scan gives its offset, and it writes its tokens word
// by word (each lane one bit: coalesced stores), each with the bits of the blocks whose bitmap holds
// it. (Until 2026-11-30 the CTA merged two lists at a time along the merge path, in staged tiles of
// 2,048 positions, groups of three through a scratch list: 1.6x slower at 16K and 32K, 1.1x at 128K
// on SmolLM2's plan, docs/perf.md.)
#define UB_THREADS 256
#define UB_WORDS 1024                         // bitmap words per chunk and block
#define UB_WPW (UB_WORDS / (UB_THREADS / 32))  // words per warp
#define UB_CHUNK (UB_WORDS * 32)
#define UB_LOADS 4
#define UB_ROUND (UB_THREADS * UB_LOADS)

// Block-wide sums of three ints (UB_THREADS threads; `red` holds 3 * UB_THREADS / 32 ints).
__device__ __forceinline__ int3 ub_sum3(int3 v, int* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int sh = 16; sh > 0; sh >>= 1) {
        v.x += __shfl_xor_sync(0xffffffffu, v.x, sh);
        v.y += __shfl_xor_sync(0xffffffffu, v.y, sh);
        v.z += __shfl_xor_sync(0xffffffffu, v.z, sh);
    }
    if (lane == 0) {
        red[3 * warp] = v.x;
        red[3 * warp + 1] = v.y;
        red[3 * warp + 2] = v.z;
    }
    __syncthreads();
    int3 t = make_int3(0, 0, 0);
#pragma unroll
    for (int k = 0; k < UB_THREADS / 32; ++k) {
        t.x += red[3 * k];
        t.y += red[3 * k + 1];
        t.z += red[3 * k + 2];
    }
    __syncthreads();  // before red is written again
    return t;
}

extern "C" __global__ void __launch_bounds__(UB_THREADS)
    ix_group_union(const u32* __restrict__ col_off, const u32* __restrict__ col_idx, int q_heads, int q_blocks,
                   int group, u32* __restrict__ out_idx, u32* __restrict__ out_len) {
    __shared__ u32 bm[3][UB_WORDS];
    __shared__ int red[3 * UB_THREADS / 32];
    __shared__ int past_flags[3];  // per round r, slot r % 3: the lists whose round met the chunk's end
    const u32 NONE = 0xffffffffu;
    const int q_groups = (q_blocks + group - 1) / group;
    const int w = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (w >= q_heads * q_groups) return;  // w is the same in the whole CTA
    const int h = w / q_groups, p = w % q_groups;
    const int e = h * q_blocks + group * p;  // the group's first block
    const int token_bits = 32 - group;
    const u32* list[3];
    int len[3], before[3] = {0, 0, 0};  // entries of each list before the current chunk
    u32 end = 0;                        // one past the largest token of the group
#pragma unroll
    for (int i = 0; i < 3; ++i) {
        const bool real = i < group && group * p + i < q_blocks;
        len[i] = real ? (int)(col_off[e + i + 1] - col_off[e + i]) : 0;
        list[i] = col_idx + (real ? col_off[e + i] : 0u);
        if (len[i] > 0) end = max(end, list[i][len[i] - 1] + 1);
    }
    if (tid < 3) past_flags[tid] = 0;
    u32* out = out_idx + col_off[e];
    int written = 0, round = 0;
    for (u32 c0 = 0; c0 < end; c0 += UB_CHUNK) {
        const u32 c1 = min(end, c0 + (u32)UB_CHUNK);
        const int words = (int)((c1 - c0 + 31) >> 5);
#pragma unroll
        for (int i = 0; i < 3; ++i)
            for (int k = tid; k < words; k += UB_THREADS) bm[i][k] = 0u;
        __syncthreads();
        int base[3], mine[3] = {0, 0, 0};
        bool active[3];
#pragma unroll
        for (int i = 0; i < 3; ++i) {
            base[i] = before[i];
            active[i] = base[i] < len[i];
        }
        while (active[0] || active[1] || active[2]) {
            u32 t[3][UB_LOADS];
#pragma unroll
            for (int i = 0; i < 3; ++i)
#pragma unroll
                for (int u = 0; u < UB_LOADS; ++u) {
                    const int j = base[i] + u * UB_THREADS + tid;
                    t[i][u] = active[i] && j < len[i] ? list[i][j] : NONE;
                }
            int past = 0;
#pragma unroll
            for (int i = 0; i < 3; ++i) {
#pragma unroll
                for (int u = 0; u < UB_LOADS; ++u) {
                    if (t[i][u] < c1) {
                        atomicOr(&bm[i][(t[i][u] - c0) >> 5], 1u << ((t[i][u] - c0) & 31));
                        ++mine[i];
                    } else if (t[i][u] != NONE) {
                        past |= 1 << i;
                    }
                }
                if (active[i] && base[i] + UB_ROUND >= len[i]) past |= 1 << i;  // the same in every thread
            }
            const int slot = round % 3;
            if (past) atomicOr(&past_flags[slot], past);
            __syncthreads();
            const int flags = past_flags[slot];
            if (tid == 0) past_flags[(round + 2) % 3] = 0;  // read last round, written next-but-one
            ++round;
#pragma unroll
            for (int i = 0; i < 3; ++i) {
                if (flags >> i & 1) active[i] = false;
                else base[i] += UB_ROUND;  // the whole round was below c1
            }
        }
        if (c1 < end) {  // the next chunk starts after this one's entries
            const int3 taken = ub_sum3(make_int3(mine[0], mine[1], mine[2]), red);
            before[0] += taken.x;
            before[1] += taken.y;
            before[2] += taken.z;
        }
        __syncthreads();  // every bit set
        // warp `warp` writes words [w0, w1): its count, a block scan for its offset, then word by word
        // each lane its bit, so that every store of the warp is contiguous
        const int w0 = warp * UB_WPW, w1 = min(words, w0 + UB_WPW);
        int cnt = 0;
        for (int k = w0 + lane; k < w1; k += 32) cnt += __popc(bm[0][k] | bm[1][k] | bm[2][k]);
#pragma unroll
        for (int sh = 16; sh > 0; sh >>= 1) cnt += __shfl_xor_sync(0xffffffffu, cnt, sh);
        if (lane == 0) red[warp] = cnt;
        __syncthreads();
        int pre = 0, total = 0;
#pragma unroll
        for (int k = 0; k < UB_THREADS / 32; ++k) {
            const int v = red[k];
            pre += k < warp ? v : 0;
            total += v;
        }
        u32* dst = out + written + pre;
        const u32 below = (1u << lane) - 1;
        for (int k = w0; k < w1; ++k) {
            const u32 b0 = bm[0][k], b1 = bm[1][k], b2 = bm[2][k], x = b0 | b1 | b2;
            if (x >> lane & 1u)
                dst[__popc(x & below)] = (c0 + (u32)k * 32u + (u32)lane) | (b0 >> lane & 1u) << token_bits |
                                         (b1 >> lane & 1u) << (token_bits + 1) |
                                         (b2 >> lane & 1u) << min(token_bits + 2, 31);
            dst += __popc(x);
        }
        written += total;
        __syncthreads();  // before the next chunk clears the bitmaps and red
    }
    if (tid == 0) out_len[w] = (u32)written;
}

