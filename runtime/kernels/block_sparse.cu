// Block-sparse index building on the GPU: the selection of `runtime::pattern::block_sparse` for every
// head of a layer, with per-head `top_k` or `coverage`.
//
// 1. bs_pool_d*: the mean of each 64-row block of Q (per query head) and of K (per KV head), in f64,
//    rows summed in order (as the CPU's `mean_rows`).
// 2. bs_score_d*: the pooled scores q̄ · k̄ / sqrt(d) of every causal (query block, key block), f64,
//    products and sums unfused and in the CPU's order, tiled 64 x 64, for a chunk of query blocks
//    into a scratch matrix (the host bounds the chunk so the scratch stays below 512 MB).
//    bs_select: one warp per (head, query block) of the chunk: the softmax of its scores, then the
//    selection: the forced blocks (0 and the diagonal block) and the leading blocks of the rest by
//    descending estimate, ties to the lower index, either `top_k` of them in all or the fewest whose
//    estimated mass reaches `coverage`. The rest is ranked by a radix select on the f64 bits
//    (estimates are >= 0, so the bits order like the values), 8 bits per pass; for coverage the
//    passes sum mass instead of counting. Writes a bitmask of the selected key blocks per (head,
//    query block) and their count.
// 3. vs_scan (vertical_slash.cu) turns the counts into `blk_off`; bs_fill writes the sorted lists.
//
// Differences from the CPU: exp is CUDA's (within 1 ulp of glibc's) and the softmax sum and the
// coverage sums run in another order, so estimates may differ in the last bits; selections can then
// differ only where two estimates, or a cumulative mass and the coverage, agree to ~1e-15. The mass
// histograms of coverage use f64 atomics, whose order varies between runs: such a boundary case may
// also vary between runs.

#define BS_THREADS 256
// mode[h] of a head whose index is not wanted: its lists stay empty and no work is done for it
#define BS_SKIP 2u

// Mean of one 64-row block of Q (blocks 0 .. q_heads * q_blocks) or K (the next kv_heads * q_blocks):
// thread c sums column c over the block's rows in order, in f64.
template <int D>
__device__ __forceinline__ void bs_pool(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, int n,
                                        int q_heads, const u32* __restrict__ mode, double* __restrict__ qbar,
                                        double* __restrict__ kbar) {
    const int q_blocks = (n + 63) / 64;
    int id = blockIdx.x;
    const bf16_t* src = q;
    double* dst = qbar;
    if (id >= q_heads * q_blocks) {
        id -= q_heads * q_blocks;
        src = k;
        dst = kbar;
    } else if (mode[id / q_blocks] == BS_SKIP) {
        return;
    }
    const int head = id / q_blocks, blk = id % q_blocks, c = threadIdx.x;
    const int r0 = blk * 64, r1 = min(r0 + 64, n);
    const bf16_t* base = src + (u64)head * n * D + c;
    double sum = 0.0;
    for (int r = r0; r < r1; ++r) sum = __dadd_rn(sum, (double)bf16_to_f32(base[(u64)r * D]));
    dst[(u64)id * D + c] = sum / (double)(r1 - r0);
}

extern "C" __global__ void __launch_bounds__(64) bs_pool_d64(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                                             int n, int q_heads, const u32* __restrict__ mode,
                                                             double* __restrict__ qbar, double* __restrict__ kbar) {
    bs_pool<64>(q, k, n, q_heads, mode, qbar, kbar);
}

extern "C" __global__ void __launch_bounds__(128) bs_pool_d128(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                                               int n, int q_heads, const u32* __restrict__ mode,
                                                               double* __restrict__ qbar, double* __restrict__ kbar) {
    bs_pool<128>(q, k, n, q_heads, mode, qbar, kbar);
}

// Pooled scores of query blocks q0 .. q0 + rows (a chunk) against their causal key blocks, into
// `est[(h * rows + qb - q0) * q_blocks + kb]` (scaled, before the softmax). grid (key tiles, query
// tiles of the chunk, q_heads), BS_THREADS threads; a CTA computes a 64 x 64 tile, each thread 4 x 4
// dots (rows ty + 16i, key blocks tx + 16j) with the head dims taken 16 at a time in order, so every
// dot is summed in the CPU's order; tiles above the diagonal exit at once.
#define BS_TQ 64
#define BS_TC 16
template <int D>
__device__ __forceinline__ void bs_score(const double* __restrict__ qbar, const double* __restrict__ kbar, int n,
                                         int group, int q0, int rows, double scale, const u32* __restrict__ mode,
                                         double* __restrict__ est) {
    __shared__ double qs[BS_TC][BS_TQ];
    __shared__ double ks[BS_TC][BS_TQ];
    const int q_blocks = (n + 63) / 64;
    const int kt0 = blockIdx.x * BS_TQ, qt0 = q0 + blockIdx.y * BS_TQ, h = blockIdx.z, kvh = h / group;
    const int q_end = min(q0 + rows, qt0 + BS_TQ);  // query blocks of this tile: qt0 .. q_end
    if (kt0 > q_end - 1 || mode[h] == BS_SKIP) return;  // no causal cell, or no index wanted
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    double acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0;
    for (int c0 = 0; c0 < D; c0 += BS_TC) {
        __syncthreads();  // the previous chunk is consumed
        for (int i = tid; i < BS_TQ * BS_TC; i += BS_THREADS) {
            const int r = i / BS_TC, c = i % BS_TC;
            const int qb = qt0 + r, kb = kt0 + r;
            qs[c][r] = qb < q_end ? qbar[((u64)h * q_blocks + qb) * D + c0 + c] : 0.0;
            ks[c][r] = kb < q_blocks ? kbar[((u64)kvh * q_blocks + kb) * D + c0 + c] : 0.0;
        }
        __syncthreads();
#pragma unroll
        for (int c = 0; c < BS_TC; ++c) {
            double a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = qs[c][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = ks[c][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = __dadd_rn(acc[i][j], __dmul_rn(a[i], b[j]));
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int qb = qt0 + ty + 16 * i;
        if (qb >= q_end) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int kb = kt0 + tx + 16 * j;
            if (kb <= qb) est[((u64)h * rows + qb - q0) * q_blocks + kb] = __dmul_rn(acc[i][j], scale);
        }
    }
}

extern "C" __global__ void __launch_bounds__(BS_THREADS)
    bs_score_d64(const double* __restrict__ qbar, const double* __restrict__ kbar, int n, int group, int q0, int rows,
                 double scale, const u32* __restrict__ mode, double* __restrict__ est) {
    bs_score<64>(qbar, kbar, n, group, q0, rows, scale, mode, est);
}

extern "C" __global__ void __launch_bounds__(BS_THREADS)
    bs_score_d128(const double* __restrict__ qbar, const double* __restrict__ kbar, int n, int group, int q0, int rows,
                  double scale, const u32* __restrict__ mode, double* __restrict__ est) {
    bs_score<128>(qbar, kbar, n, group, q0, rows, scale, mode, est);
}

// The selection of query blocks q0 .. q0 + rows of every head from bs_score's `est` (softmax in place):
// one warp per (head, query block), BS_THREADS / 32 per CTA, each with its own digit histograms.
// Per head h: mode[h] 0 = top_k (topk[h] blocks in all), 1 = coverage (cover[h] in (0, 1]; at least
// topk[h] blocks in all, FlexPrefill's floor), BS_SKIP = no index (empty lists).
// Outputs per entry e = h * q_blocks + qb: mask[e * words ..] (bit kb: key block kb selected; words =
// ceil(q_blocks / 32); only the words up to the diagonal block are written) and cnt[e] (selected
// blocks).
extern "C" __global__ void __launch_bounds__(BS_THREADS)
    bs_select(double* __restrict__ est, int n, int q_heads, int q0, int rows, const u32* __restrict__ mode,
              const u32* __restrict__ topk, const double* __restrict__ cover, u32* __restrict__ mask,
              u32* __restrict__ cnt) {
    __shared__ u32 hc_all[BS_THREADS / 32 * 256];     // per warp: digit counts
    __shared__ double hm_all[BS_THREADS / 32 * 256];  // and digit masses (coverage)
    const int q_blocks = (n + 63) / 64, words = (q_blocks + 31) / 32;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int item = blockIdx.x * (BS_THREADS / 32) + warp;
    if (item >= q_heads * rows) return;
    const int h = item / rows, qb = q0 + item % rows;
    if (mode[h] == BS_SKIP) {  // empty lists
        for (int w = lane; w < (qb + 32) / 32; w += 32) mask[((u64)h * q_blocks + qb) * words + w] = 0;
        if (lane == 0) cnt[(u64)h * q_blocks + qb] = 0;
        return;
    }
    bool by_cover = mode[h] != 0;
    u32 k_all = topk[h];  // top_k: blocks in all; coverage: a floor (blocks in all)
    const double c_cover = cover[h];
    u32* hc = hc_all + warp * 256;
    double* hm = hm_all + warp * 256;
    const int causal = qb + 1;
    double* e = est + ((u64)h * rows + qb - q0) * q_blocks;
    // softmax over the causal key blocks
    double m = -__longlong_as_double(0x7ff0000000000000ll);  // -inf
    for (int kb = lane; kb < causal; kb += 32) m = fmax(m, e[kb]);
#pragma unroll
    for (int sh = 16; sh >= 1; sh >>= 1) m = fmax(m, __shfl_xor_sync(0xffffffff, m, sh));
    double z = 0.0;
    for (int kb = lane; kb < causal; kb += 32) {
        const double x = exp(e[kb] - m);
        e[kb] = x;
        z += x;
    }
#pragma unroll
    for (int sh = 16; sh >= 1; sh >>= 1) z += __shfl_xor_sync(0xffffffff, z, sh);
    for (int kb = lane; kb < causal; kb += 32) e[kb] = e[kb] / z;
    __syncwarp();

    // forced: block 0 and the diagonal block qb (one block when qb = 0); the rest is 1 .. qb - 1
    const int forced = qb == 0 ? 1 : 2;
    const int rest = causal - forced;
    const double fm = qb == 0 ? e[0] : (0.0 + e[0]) + e[qb];
    // The selection: the rest blocks whose key, masked by pmask, lies above prefix, and the first
    // `take` (in index order) of those equal to it. The radix passes stop early once the chosen bin is
    // taken whole (its blocks then differ only in bits below pmask).
    u64 prefix = 0, pmask = 0;
    u32 take = 0;
    bool all = false, none = false;
    // a coverage selection with fewer blocks than its floor is redone as top_k at the floor
    for (int attempt = 0; attempt < 2; ++attempt) {
    u32 need = 0;  // top_k: blocks of the rest to take
    all = false;
    if (by_cover) {
        none = fm >= c_cover;
    } else {
        const u32 total = min(max(k_all, (u32)forced), (u32)causal);
        need = total - forced;
        none = need == 0;
        all = need >= (u32)rest;
    }
    if (rest <= 0) none = true;
    prefix = 0;
    pmask = 0;
    take = 0;
    u32 above = 0;  // rest blocks with a key above the current prefix range
    if (!none && !all) {
        double acc = 0.0;  // and their mass
        for (int pass = 7; pass >= 0; --pass) {
            const int shift = pass * 8;
            for (int i = lane; i < 256; i += 32) {
                hc[i] = 0;
                hm[i] = 0.0;
            }
            __syncwarp();
            for (int base = 1; base < qb; base += 128) {  // four estimates per lane in flight
                double x[4];
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const int kb = base + 32 * u + lane;
                    x[u] = kb < qb ? e[kb] : 0.0;
                }
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const u64 key = (u64)__double_as_longlong(x[u]);
                    const bool on = base + 32 * u + lane < qb && (key & pmask) == prefix;
                    hist_inc_mass(hc, hm, (u32)((key >> shift) & 255), x[u], on, by_cover);
                }
            }
            __syncwarp();
            // digits from the top: lane l holds bins 255 - 8l down to 248 - 8l; inclusive scans over
            // the lanes give what lies above each lane's bins
            u32 lc, ic;
            double lm, im;
            bins_from_top(hc, hm, lc, lm, ic, im);
            const bool reach = lc > 0 && (by_cover ? fm + (acc + im) >= c_cover : above + ic >= need);
            const u32 ballot = __ballot_sync(0xffffffff, reach);
            if (ballot == 0) {  // coverage not reached (rounding): every block, as on the CPU
                all = true;
                break;
            }
            const int L = __ffs(ballot) - 1;
            int chosen = 0;
            u32 a = above + ic - lc;
            double ac = acc + (im - lm);
            u32 t = 0;
            bool whole = false;  // the chosen bin is taken whole: no further pass is needed
            if (lane == L) {
                for (int j = 0; j < 8; ++j) {
                    const int dg = 255 - 8 * lane - j;
                    const bool r = hc[dg] > 0 && (by_cover ? fm + (ac + hm[dg]) >= c_cover : a + hc[dg] >= need);
                    if (r) {
                        chosen = dg;
                        break;
                    }
                    a += hc[dg];
                    ac += hm[dg];
                }
                // top_k: the bin completes `need`; coverage: a single block reaches it
                whole = by_cover ? hc[chosen] == 1 : a + hc[chosen] == need;
                if (whole) {
                    t = hc[chosen];
                } else if (pass == 0) {
                    // ties (estimate == the threshold) are taken in index order
                    if (by_cover) {
                        const double et = __longlong_as_double((long long)(prefix | (u64)chosen));
                        double sum = fm + ac;
                        while (t < hc[chosen]) {
                            sum += et;
                            ++t;
                            if (sum >= c_cover) break;
                        }
                    } else {
                        t = need - a;
                    }
                }
            }
            chosen = __shfl_sync(0xffffffff, chosen, L);
            above = __shfl_sync(0xffffffff, a, L);
            acc = __shfl_sync(0xffffffff, ac, L);
            take = __shfl_sync(0xffffffff, t, L);
            whole = __shfl_sync(0xffffffff, whole, L);
            prefix |= (u64)chosen << shift;
            pmask |= (u64)255 << shift;
            __syncwarp();
            if (whole) break;
        }
    }
    if (!by_cover) break;
    const u32 count = none ? (u32)forced : (all ? (u32)causal : (u32)forced + above + take);
    const u32 floor_blocks = min(k_all, (u32)causal);
    if (count >= floor_blocks) break;
    by_cover = false;  // k_all is the floor
    }
    // flags, 32-aligned chunks per lane so that each bitmask word has one writer
    const int per = ((causal + 31) / 32 + 31) / 32 * 32;
    const int a0 = min(causal, lane * per), a1 = min(causal, a0 + per);
    u32 ties = 0;
    if (!none && !all) {
        for (int kb = max(a0, 1); kb < min(a1, qb); ++kb) ties += ((u64)__double_as_longlong(e[kb]) & pmask) == prefix;
    }
    u32 tie_rank = ties;
#pragma unroll
    for (int sh = 1; sh < 32; sh <<= 1) {
        const u32 y = __shfl_up_sync(0xffffffff, tie_rank, sh);
        if (lane >= sh) tie_rank += y;
    }
    tie_rank -= ties;
    u32 selected = 0;
    for (int w0 = a0; w0 < a1; w0 += 32) {
        u32 bits = 0;
        for (int kb = w0; kb < min(a1, w0 + 32); ++kb) {
            bool sel;
            if (kb == 0 || kb == qb || all) {
                sel = true;
            } else if (none) {
                sel = false;
            } else {
                const u64 key = (u64)__double_as_longlong(e[kb]) & pmask;
                sel = key > prefix;
                if (key == prefix) sel = tie_rank++ < take;
            }
            if (sel) bits |= 1u << (kb - w0);
        }
        selected += __popc(bits);
        mask[((u64)h * q_blocks + qb) * words + w0 / 32] = bits;
    }
#pragma unroll
    for (int sh = 16; sh >= 1; sh >>= 1) selected += __shfl_xor_sync(0xffffffff, selected, sh);
    if (lane == 0) cnt[(u64)h * q_blocks + qb] = selected;
}

// One warp per (head, query block): the selected key blocks of its bitmask, ascending, at blk_off[e].
extern "C" __global__ void bs_fill(const u32* __restrict__ mask, int n, int q_heads, const u32* __restrict__ blk_off,
                                   u32* __restrict__ blk_idx) {
    const int q_blocks = (n + 63) / 64, words = (q_blocks + 31) / 32;
    const int e = blockIdx.x * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (e >= q_heads * q_blocks) return;
    const int qb = e % q_blocks;
    const int used = (qb + 1 + 31) / 32;  // words that can hold a causal block
    u32 pos = blk_off[e];
    for (int w0 = 0; w0 < used; w0 += 32) {
        const int w = w0 + lane;
        u32 bits = w < used ? mask[(u64)e * words + w] : 0;
        const u32 c = __popc(bits);
        u32 inc = c;
#pragma unroll
        for (int sh = 1; sh < 32; sh <<= 1) {
            const u32 y = __shfl_up_sync(0xffffffff, inc, sh);
            if (lane >= sh) inc += y;
        }
        u32 p = pos + inc - c;
        while (bits) {
            const int b = __ffs(bits) - 1;
            blk_idx[p++] = (u32)(w * 32 + b);
            bits &= bits - 1;
        }
        pos += __shfl_sync(0xffffffff, inc, 31);
    }
}
