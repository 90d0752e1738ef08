// Sparse causal flash-attention forward (prefill), bf16 in, f32 accumulate, online softmax.
//
// One CTA (4 warps, 128 threads) computes one query block of 64 rows of one query head; each warp owns
// 16 rows. The key set of the block is the `HeadIndex` form: `nb` key blocks of 64 keys computed in
// full (causal mask applied) followed by `nc` gathered key columns, taken 64 at a time. The dense case
// is the same loop with key blocks 0..=last_row/64 (`dense != 0`, index arrays unused).
//
// Index arrays are flattened over heads: entry `h * q_blocks + qb` of `blk_off` / `col_off` (each
// `q_heads * q_blocks + 1` long) starts that block's list in `blk_idx` (key block numbers) and
// `col_idx` (token numbers).
//
// Layout: Q, O `[q_heads, n, D]`, K, V `[kv_heads, n, D]`, row-major bf16; query head h reads KV head
// h / group (GQA without copies).
//
// Tiles: Q 64 x D stays in registers (ldmatrix once); K and V tiles 64 x D are double-buffered in
// shared memory with cp.async (zero-fill for missing rows), XOR-swizzled for ldmatrix; S = Q K^T and
// O += P V use mma.sync m16n8k16 (bf16, f32 accumulate); P goes from the S accumulators to A fragments
// in registers without shared memory.
//
// Grid: one CTA per (query block, head). Dense: the heaviest query blocks (the last ones, under a causal
// mask) of all heads start first (qb = q_blocks - 1 - id / q_heads, h = id % q_heads). Index: head-major
// (h = id / q_blocks, qb = q_blocks - 1 - id % q_blocks), so CTAs running together share K/V in L2.

// Headroom of the lazy running max of softmax_tile, log2 units (P stays below 2^8 = 256).
#define RESCALE_LOG2 8.f

// One in exp2_emu<D>() of a thread's 8 S column pairs takes its exponentials on the FMA pipe
// (exp2_fma) instead of the MUFU unit (0: none). At head_dim 64 a tile's exponentials take MUFU about
// as long as its two MMAs take the tensor cores, and one pair in four was measured 2-3% faster sparse
// and 4-5% faster dense at 128K; at head_dim 128 it was slower (docs/perf.md). The host may override
// both (`ATTNPLAN_EXP2_EMU`).
#ifndef EXP2_EMU_D64
#define EXP2_EMU_D64 4
#endif
#ifndef EXP2_EMU_D128
#define EXP2_EMU_D128 0
#endif
template <int D>
__device__ __forceinline__ constexpr int exp2_emu() {
    return D == 64 ? EXP2_EMU_D64 : EXP2_EMU_D128;
}

// How softmax_tile keeps the row sums of P: SUMS_F32 adds the f32 values; SUMS_ROUNDED adds them as
// rounded to bf16 (the values P.V multiplies); SUMS_MMA leaves them to the caller, whose P.V wgmma
// multiplies the same bf16 P by a tile of ones (attn_fwd_ws). Under the lazy max P reaches
// 2^RESCALE_LOG2, and a dominant key's bf16 rounding (relative 2^-9) then differs between numerator
// and denominator by up to 0.4% with f32 sums: at head_dim 64 that put block-sparse errors at 1.2-2.0x
// SDPA's (docs/perf.md). Either of the other two makes the normalisation consistent with what O
// accumulated. ROUNDED_SUMS_D64 / _D128 pick 0 (f32), 1 (rounded) or 2 (MMA where the kernel can,
// else rounded); the host may override both (`ATTNPLAN_ROUNDED_SUMS`).
#define SUMS_F32 0
#define SUMS_ROUNDED 1
#define SUMS_MMA 2
#ifndef ROUNDED_SUMS_D64
#define ROUNDED_SUMS_D64 2
#endif
#ifndef ROUNDED_SUMS_D128
#define ROUNDED_SUMS_D128 0
#endif
// The sums mode of a kernel at head_dim D; `mma`: whether the kernel sums P by MMA when asked to.
template <int D>
__device__ __forceinline__ constexpr int sums_mode(bool mma) {
    return (D == 64 ? ROUNDED_SUMS_D64 : ROUNDED_SUMS_D128) == SUMS_MMA
               ? (mma ? SUMS_MMA : SUMS_ROUNDED)
               : (D == 64 ? ROUNDED_SUMS_D64 : ROUNDED_SUMS_D128);
}

// The two bf16 halves of a packed pair as f32, summed (pack_bf16 puts `lo` in the low half).
__device__ __forceinline__ float bf16x2_sum(u32 v) {
    return __uint_as_float(v << 16) + __uint_as_float(v & 0xffff0000u);
}

// 2^x for x <= 2^22 with FMA-pipe instructions only, as FlashAttention-4 does to relieve MUFU: x is
// split into j = round(x) (added to the exponent bits) and f = x - j in [-0.5, 0.5], and 2^f is a
// degree-3 polynomial with p(0) = 1 (relative error <= 1.02e-4, far below bf16's 2^-9; exact at integer
// x, e.g. the row maximum). x <= -127 (and -inf, a masked key) gives 0.
__device__ __forceinline__ float exp2_fma(float x) {
    x = fmaxf(x, -127.f);
    const float t = x + 12582912.f;  // 1.5 * 2^23: round(x) in the low mantissa bits
    const float j = t - 12582912.f;
    const float f = x - j;
    const float p = fmaf(fmaf(fmaf(0.05500842f, f, 0.24220998f), f, 0.69328287f), f, 1.f);
    return __int_as_float(__float_as_int(p) + (__float_as_int(t) << 23));
}

// The exponential of column pair J of a tile: exp2_fma for one pair in EMU, else ex2.approx.
template <int J, int EMU>
__device__ __forceinline__ float tile_exp2(float x) {
    if (EMU > 0 && J % (EMU > 0 ? EMU : 1) == (EMU > 0 ? EMU : 1) - 1) return exp2_fma(x);
    return fast_exp2(x);
}

// P of column pair J of a tile (rows a and b) and the pair's row sums.
template <int J, int EMU>
__device__ __forceinline__ void exp_pair(float (*s)[4], float* ta, float* tb, float scale_log2, float use_a,
                                         float use_b) {
    s[J][0] = tile_exp2<J, EMU>(fmaf(s[J][0], scale_log2, -use_a));
    s[J][1] = tile_exp2<J, EMU>(fmaf(s[J][1], scale_log2, -use_a));
    s[J][2] = tile_exp2<J, EMU>(fmaf(s[J][2], scale_log2, -use_b));
    s[J][3] = tile_exp2<J, EMU>(fmaf(s[J][3], scale_log2, -use_b));
    ta[J] = s[J][0] + s[J][1];
    tb[J] = s[J][2] + s[J][3];
}

// The running max of rows a and b after a tile whose row maxima, partial over this thread's columns,
// are mx_a and mx_b (raw scores): it moves only when the tile's max passes it by more than
// RESCALE_LOG2 (as FlashAttention-4 does): then P <= 2^RESCALE_LOG2, which bf16 and the f32 sums hold
// with the same relative precision, and O needs no rescale (alpha = 1) on most tiles. Starting from
// -inf any finite max moves it; a row with no visible key so far keeps -inf (and P = 0). Sets the
// offsets the exponentials subtract (use_*) and O's factors (al_*). A row moves iff one of its quad's
// partial maxima passes the bound, so with LAZY the quad's maxima are reduced (two dependent shuffles
// per row, ahead of every exponential) only when some row of the warp moves: same values, 2-7%
// faster with two consumer warpgroups at head_dim 128 on the H200, ~1% slower with three at 64
// (docs/perf.md, "Fifteenth session"). Returns, with LAZY, whether some row of the warp moved, i.e.
// some alpha is not 1 (so that the caller's rescale of O needs no vote of its own); without, true.
template <bool LAZY>
__device__ __forceinline__ bool lazy_row_max(float mx_a, float mx_b, float scale_log2, float& m_a, float& m_b,
                                             float& use_a, float& use_b, float& al_a, float& al_b) {
    const bool moved =
        !LAZY ||
        __any_sync(0xffffffff, mx_a * scale_log2 > m_a + RESCALE_LOG2 || mx_b * scale_log2 > m_b + RESCALE_LOG2);
    if (moved) {
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffff, mx_a, 1));
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffff, mx_a, 2));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffff, mx_b, 1));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffff, mx_b, 2));
    }
    const float cand_a = mx_a * scale_log2, cand_b = mx_b * scale_log2;
    const bool up_a = cand_a > m_a + RESCALE_LOG2, up_b = cand_b > m_b + RESCALE_LOG2;
    const float mn_a = up_a ? cand_a : m_a, mn_b = up_b ? cand_b : m_b;
    use_a = mn_a == NEG_INF ? 0.f : mn_a;
    use_b = mn_b == NEG_INF ? 0.f : mn_b;
    al_a = up_a ? fast_exp2(m_a - use_a) : 1.f;
    al_b = up_b ? fast_exp2(m_b - use_b) : 1.f;
    m_a = mn_a;
    m_b = mn_b;
    return moved;
}

// The online softmax of one 64-key S tile, shared by every attention kernel: the mma.sync and wgmma
// accumulators have the same layout (this thread holds rows ra and rb = ra + 8, columns 8j + 2tq and
// 8j + 2tq + 1). When `mask`, masks the keys past each row (positions `kp`, POS_NONE for missing rows);
// updates the running max m and sum l (log2 units), writes P as bf16 A fragments to `p` and returns
// the factors O must be scaled by.
template <int EMU, int SUMS, bool LAZY_SHFL = false>
__device__ __forceinline__ bool softmax_tile(float (*s)[4], const int* kp, bool mask, int ra, int rb, int tq,
                                             float scale_log2, float& m_a, float& m_b, float& l_a, float& l_b,
                                             u32 (*p)[4], float& al_a, float& al_b) {
    if (mask) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int p0 = kp[j * 8 + 2 * tq], p1 = kp[j * 8 + 2 * tq + 1];
            if (p0 > ra) s[j][0] = NEG_INF;
            if (p1 > ra) s[j][1] = NEG_INF;
            if (p0 > rb) s[j][2] = NEG_INF;
            if (p1 > rb) s[j][3] = NEG_INF;
        }
    }
    // row maxima as trees (a chain of 16 dependent FMNMX was a visible latency stall)
    float ta[8], tb[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        ta[j] = fmaxf(s[j][0], s[j][1]);
        tb[j] = fmaxf(s[j][2], s[j][3]);
    }
#pragma unroll
    for (int w = 4; w >= 1; w >>= 1) {
#pragma unroll
        for (int j = 0; j < w; ++j) {
            ta[j] = fmaxf(ta[j], ta[j + w]);
            tb[j] = fmaxf(tb[j], tb[j + w]);
        }
    }
    float use_a, use_b;
    const bool moved = lazy_row_max<LAZY_SHFL>(ta[0], tb[0], scale_log2, m_a, m_b, use_a, use_b, al_a, al_b);
    exp_pair<0, EMU>(s, ta, tb, scale_log2, use_a, use_b);
    exp_pair<1, EMU>(s, ta, tb, scale_log2, use_a, use_b);
    exp_pair<2, EMU>(s, ta, tb, scale_log2, use_a, use_b);
    exp_pair<3, EMU>(s, ta, tb, scale_log2, use_a, use_b);
    exp_pair<4, EMU>(s, ta, tb, scale_log2, use_a, use_b);
    exp_pair<5, EMU>(s, ta, tb, scale_log2, use_a, use_b);
    exp_pair<6, EMU>(s, ta, tb, scale_log2, use_a, use_b);
    exp_pair<7, EMU>(s, ta, tb, scale_log2, use_a, use_b);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        p[kk][0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
        p[kk][1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
        p[kk][2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        p[kk][3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        if (SUMS == SUMS_ROUNDED) {  // the f32 pair sums of exp_pair are then dead code
            ta[2 * kk] = bf16x2_sum(p[kk][0]);
            tb[2 * kk] = bf16x2_sum(p[kk][1]);
            ta[2 * kk + 1] = bf16x2_sum(p[kk][2]);
            tb[2 * kk + 1] = bf16x2_sum(p[kk][3]);
        }
    }
    if (SUMS == SUMS_MMA) return moved;  // the caller's P.V MMA sums P (l unused)
#pragma unroll
    for (int w = 4; w >= 1; w >>= 1) {  // row sums as trees too
#pragma unroll
        for (int j = 0; j < w; ++j) {
            ta[j] += ta[j + w];
            tb[j] += tb[j + w];
        }
    }
    const float sum_a = ta[0], sum_b = tb[0];
    l_a = l_a * al_a + sum_a;
    l_b = l_b * al_b + sum_b;
    return moved;
}

// Normalizes this thread's O rows (ra, rb) by their softmax sums and stores them as bf16.
template <int D>
__device__ __forceinline__ void store_rows(float (*o)[4], float l_a, float l_b, bf16_t* oh, int ra, int rb, int n,
                                           int tq) {
    l_a += __shfl_xor_sync(0xffffffff, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffff, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffff, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffff, l_b, 2);
    const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f, inv_b = l_b > 0.f ? 1.f / l_b : 0.f;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
        const int c = i * 8 + 2 * tq;
        if (ra < n) *(u32*)(oh + (u64)ra * D + c) = pack_bf16(o[i][0] * inv_a, o[i][1] * inv_a);
        if (rb < n) *(u32*)(oh + (u64)rb * D + c) = pack_bf16(o[i][2] * inv_b, o[i][3] * inv_b);
    }
}

template <int D>
__device__ __forceinline__ void attn_fwd(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                         const bf16_t* __restrict__ v, bf16_t* __restrict__ out,
                                         const u32* __restrict__ blk_off, const u32* __restrict__ blk_idx,
                                         const u32* __restrict__ col_off, const u32* __restrict__ col_idx,
                                         int n, int q_heads, int group, float scale_log2, int dense) {
    constexpr int BM = 64, BN = 64;
    constexpr int CPR = D / 8;             // 16-byte chunks per row
    constexpr int ROWS_PER_PASS = 128 / CPR;
    constexpr int PASSES = BM / ROWS_PER_PASS;
    constexpr int TILE_BYTES = BM * D * 2;

    extern __shared__ __align__(128) unsigned char smem[];
    const u32 sQ = smem_u32(smem);
    const u32 sK = sQ + TILE_BYTES;            // 2 stages
    const u32 sV = sK + 2 * TILE_BYTES;        // 2 stages
    int* kpos = (int*)(smem + 5 * TILE_BYTES);  // [2][64] key positions of the staged tiles

    const int q_blocks = (n + BM - 1) / BM;
    const int id = blockIdx.x;
    // dense: heaviest query blocks of all heads first; index: one head's query blocks together (heaviest
    // first), since neighbouring query blocks of a head share most key blocks and columns (L2 reuse)
    const int qb = dense ? q_blocks - 1 - id / q_heads : q_blocks - 1 - id % q_blocks;
    const int h = dense ? id % q_heads : id / q_blocks;
    const int kvh = h / group;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int row0 = qb * BM;

    const bf16_t* qh = q + (u64)h * n * D;
    const bf16_t* kh = k + (u64)kvh * n * D;
    const bf16_t* vh = v + (u64)kvh * n * D;

    int nb, bstart = 0, cstart = 0, nc = 0;
    if (dense) {
        nb = (min(row0 + BM, n) - 1) / BN + 1;
    } else {
        const int e = h * q_blocks + qb;
        bstart = blk_off[e];
        nb = blk_off[e + 1] - bstart;
        cstart = col_off[e];
        nc = col_off[e + 1] - cstart;
    }
    const int ntiles = nb + (nc + BN - 1) / BN;

    // Q tile (rows past n zero-filled).
    {
        const int c = tid % CPR;
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const int r = tid / CPR + p * ROWS_PER_PASS;
            const int pos = row0 + r < n ? row0 + r : POS_NONE;
            load_rows_async<D>(sQ, qh, r, pos, c);
        }
        cp_async_commit();
    }

    auto load_tile = [&](int t, int stage) {
        const int c = tid % CPR;
        const u32 dk = sK + stage * TILE_BYTES, dv = sV + stage * TILE_BYTES;
        int kb = 0, e0 = 0;
        const bool blockwise = t < nb;
        if (blockwise) {
            kb = dense ? t : (int)blk_idx[bstart + t];
        } else {
            e0 = cstart + (t - nb) * BN;
        }
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const int r = tid / CPR + p * ROWS_PER_PASS;
            int pos;
            if (blockwise) {
                pos = kb * BN + r;
                if (pos >= n) pos = POS_NONE;
            } else {
                pos = e0 + r < cstart + nc ? (int)col_idx[e0 + r] : POS_NONE;
            }
            load_rows_async<D>(dk, kh, r, pos, c);
            load_rows_async<D>(dv, vh, r, pos, c);
            if (c == 0) kpos[stage * BN + r] = pos;
        }
    };

    // Per-thread state: rows ra = row0 + warp*16 + g and rb = ra + 8.
    const int g = lane >> 2, tq = lane & 3;
    const int ra = row0 + warp * 16 + g, rb = ra + 8;
    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.f, l_b = 0.f;
    u32 qf[D / 16][4];

    if (ntiles > 0) load_tile(0, 0);
    cp_async_commit();

    for (int t = 0; t < ntiles; ++t) {
        const int st = t & 1;
        if (t + 1 < ntiles) load_tile(t + 1, st ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if (t == 0) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const int r = warp * 16 + (lane & 15);
                const int c = kk * 2 + (lane >> 4);
                ldsm_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], sQ + swz<D>(r, c));
            }
        }
        const u32 k_st = sK + st * TILE_BYTES, v_st = sV + st * TILE_BYTES;

        // S = Q K^T for this warp's 16 rows x 64 keys.
        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int j = 0; j < 8; j += 2) {
                const int r = j * 8 + (lane & 7) + ((lane >> 4) << 3);
                const int c = kk * 2 + ((lane >> 3) & 1);
                u32 b0, b1, b2, b3;
                ldsm_x4(b0, b1, b2, b3, k_st + swz<D>(r, c));
                mma_bf16(s[j], qf[kk], b0, b1);
                mma_bf16(s[j + 1], qf[kk], b2, b3);
            }
        }

        // Mask: needed for gathered tiles, tiles reaching past the block's first row, or past n.
        bool need_mask;
        if (t < nb) {
            const int kb = dense ? t : (int)blk_idx[bstart + t];
            need_mask = kb * BN + BN - 1 > row0 || kb * BN + BN > n;
        } else {
            need_mask = true;
        }
        u32 pa[4][4];
        float al_a, al_b;
        softmax_tile<exp2_emu<D>(), sums_mode<D>(false)>(s, kpos + st * BN, need_mask, ra, rb, tq, scale_log2, m_a, m_b, l_a, l_b,
                                    pa, al_a, al_b);
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            o[i][0] *= al_a;
            o[i][1] *= al_a;
            o[i][2] *= al_b;
            o[i][3] *= al_b;
        }

        // O += P V.
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
            for (int nd = 0; nd < D / 8; nd += 2) {
                const int r = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
                const int c = nd + (lane >> 4);
                u32 b0, b1, b2, b3;
                ldsm_x4_t(b0, b1, b2, b3, v_st + swz<D>(r, c));
                mma_bf16(o[nd], pa[kk], b0, b1);
                mma_bf16(o[nd + 1], pa[kk], b2, b3);
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();

    store_rows<D>(o, l_a, l_b, out + (u64)h * n * D, ra, rb, n, tq);
}

#define ATTN_ARGS                                                                                     \
    const bf16_t *__restrict__ q, const bf16_t *__restrict__ k, const bf16_t *__restrict__ v,        \
        bf16_t *__restrict__ out, const u32 *__restrict__ blk_off, const u32 *__restrict__ blk_idx,  \
        const u32 *__restrict__ col_off, const u32 *__restrict__ col_idx, int n, int q_heads,         \
        int group, float scale_log2, int dense

extern "C" __global__ void __launch_bounds__(128, 2) attn_fwd_d128(ATTN_ARGS) {
    attn_fwd<128>(q, k, v, out, blk_off, blk_idx, col_off, col_idx, n, q_heads, group, scale_log2, dense);
}

extern "C" __global__ void __launch_bounds__(128, 3) attn_fwd_d64(ATTN_ARGS) {
    attn_fwd<64>(q, k, v, out, blk_off, blk_idx, col_off, col_idx, n, q_heads, group, scale_log2, dense);
}

// Dynamic shared memory of attn_fwd<D>: Q + 2 K + 2 V tiles + 2 x 64 key positions.
// D = 128: 5 * 16384 + 512 = 82432 bytes; D = 64: 5 * 8192 + 512 = 41472 bytes.

#ifdef ATTNPLAN_WGMMA
// The same computation with Hopper warpgroup MMA: the CTA's 4 warps are one warpgroup and its 64 query
// rows are one m64 tile. S = Q K^T is wgmma m64n64k16 (A = Q fragments in registers, B = K tile through a
// K-major 128B-swizzle descriptor); O += P V is wgmma m64nDk16 (A = P in registers, B = V tile through an
// MN-major descriptor). Accumulator fragments have the mma.sync layout per warp, so masking and the
// online softmax are unchanged. Loads: cp.async double buffering into 128B-swizzled tiles, then
// fence.proxy.async so the tensor cores' async proxy sees them.
template <int D>
__device__ __forceinline__ void attn_fwd_wg(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                            const bf16_t* __restrict__ v, bf16_t* __restrict__ out,
                                            const u32* __restrict__ blk_off, const u32* __restrict__ blk_idx,
                                            const u32* __restrict__ col_off, const u32* __restrict__ col_idx,
                                            int n, int q_heads, int group, float scale_log2, int dense) {
    constexpr int BM = 64, BN = 64;
    constexpr int CPR = D / 8;
    constexpr int ROWS_PER_PASS = 128 / CPR;
    constexpr int PASSES = BM / ROWS_PER_PASS;
    constexpr int TILE_BYTES = BM * D * 2;

    extern __shared__ __align__(1024) unsigned char smem[];
    const u32 base = (smem_u32(smem) + 1023u) & ~1023u;
    unsigned char* gbase = smem + (base - smem_u32(smem));
    const u32 sQ = base;
    const u32 sK = sQ + TILE_BYTES;
    const u32 sV = sK + 2 * TILE_BYTES;
    int* kpos = (int*)(gbase + 5 * TILE_BYTES);

    const int q_blocks = (n + BM - 1) / BM;
    const int id = blockIdx.x;
    // dense: heaviest query blocks of all heads first; index: one head's query blocks together (heaviest
    // first), since neighbouring query blocks of a head share most key blocks and columns (L2 reuse)
    const int qb = dense ? q_blocks - 1 - id / q_heads : q_blocks - 1 - id % q_blocks;
    const int h = dense ? id % q_heads : id / q_blocks;
    const int kvh = h / group;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int row0 = qb * BM;

    const bf16_t* qh = q + (u64)h * n * D;
    const bf16_t* kh = k + (u64)kvh * n * D;
    const bf16_t* vh = v + (u64)kvh * n * D;

    int nb, bstart = 0, cstart = 0, nc = 0;
    if (dense) {
        nb = (min(row0 + BM, n) - 1) / BN + 1;
    } else {
        const int e = h * q_blocks + qb;
        bstart = blk_off[e];
        nb = blk_off[e + 1] - bstart;
        cstart = col_off[e];
        nc = col_off[e + 1] - cstart;
    }
    const int ntiles = nb + (nc + BN - 1) / BN;

    {
        const int c = tid % CPR;
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const int r = tid / CPR + p * ROWS_PER_PASS;
            const int pos = row0 + r < n ? row0 + r : POS_NONE;
            const bool ok = pos != POS_NONE;
            cp_async16(sQ + swz128(r, c), qh + (ok ? (u64)pos * D + c * 8 : 0), ok ? 16 : 0);
        }
        cp_async_commit();
    }

    auto load_tile = [&](int t, int stage) {
        const int c = tid % CPR;
        const u32 dk = sK + stage * TILE_BYTES, dv = sV + stage * TILE_BYTES;
        int kb = 0, e0 = 0;
        const bool blockwise = t < nb;
        if (blockwise) {
            kb = dense ? t : (int)blk_idx[bstart + t];
        } else {
            e0 = cstart + (t - nb) * BN;
        }
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const int r = tid / CPR + p * ROWS_PER_PASS;
            int pos;
            if (blockwise) {
                pos = kb * BN + r;
                if (pos >= n) pos = POS_NONE;
            } else {
                pos = e0 + r < cstart + nc ? (int)col_idx[e0 + r] : POS_NONE;
            }
            const bool ok = pos != POS_NONE;
            const u64 off = ok ? (u64)pos * D + c * 8 : 0;
            cp_async16(dk + swz128(r, c), kh + off, ok ? 16 : 0);
            cp_async16(dv + swz128(r, c), vh + off, ok ? 16 : 0);
            if (c == 0) kpos[stage * BN + r] = pos;
        }
    };

    const int g = lane >> 2, tq = lane & 3;
    const int ra = row0 + warp * 16 + g, rb = ra + 8;
    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.f, l_b = 0.f;
    u32 qf[D / 16][4];

    if (ntiles > 0) load_tile(0, 0);
    cp_async_commit();

    for (int t = 0; t < ntiles; ++t) {
        const int st = t & 1;
        if (t + 1 < ntiles) load_tile(t + 1, st ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        fence_proxy_async();
        __syncthreads();
        if (t == 0) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const int r = warp * 16 + (lane & 15);
                const int c = kk * 2 + (lane >> 4);
                ldsm_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], sQ + swz128(r, c));
            }
        }
        const u32 k_st = sK + st * TILE_BYTES, v_st = sV + st * TILE_BYTES;

        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            // K-major: 16 d-values = 32 bytes inside a 128-byte column block
            const u64 desc = gmma_desc(k_st + (kk >> 2) * (64 * 128) + (kk & 3) * 32, 16, 1024);
            wgmma_m64n64k16<0>(&s[0][0], qf[kk], desc);
        }
        wgmma_commit();
        wgmma_wait0();

        bool need_mask;
        if (t < nb) {
            const int kb = dense ? t : (int)blk_idx[bstart + t];
            need_mask = kb * BN + BN - 1 > row0 || kb * BN + BN > n;
        } else {
            need_mask = true;
        }
        u32 pa[4][4];
        float al_a, al_b;
        softmax_tile<exp2_emu<D>(), sums_mode<D>(false)>(s, kpos + st * BN, need_mask, ra, rb, tq, scale_log2, m_a, m_b, l_a, l_b,
                                    pa, al_a, al_b);
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            o[i][0] *= al_a;
            o[i][1] *= al_a;
            o[i][2] *= al_b;
            o[i][3] *= al_b;
        }
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            // MN-major V: 16 keys = 2 groups of 8 rows (1024 B each); column blocks 64*128 B apart
            const u64 desc = gmma_desc(v_st + kk * 2048, 64 * 128, 1024);
            if constexpr (D == 128) wgmma_m64n128k16<1>(&o[0][0], pa[kk], desc);
            else wgmma_m64n64k16<1>(&o[0][0], pa[kk], desc);
        }
        wgmma_commit();
        wgmma_wait0();
        __syncthreads();
    }
    cp_async_wait<0>();

    store_rows<D>(o, l_a, l_b, out + (u64)h * n * D, ra, rb, n, tq);
}

extern "C" __global__ void __launch_bounds__(128, 2) attn_fwd_wg_d128(ATTN_ARGS) {
    attn_fwd_wg<128>(q, k, v, out, blk_off, blk_idx, col_off, col_idx, n, q_heads, group, scale_log2, dense);
}

extern "C" __global__ void __launch_bounds__(128, 3) attn_fwd_wg_d64(ATTN_ARGS) {
    attn_fwd_wg<64>(q, k, v, out, blk_off, blk_idx, col_off, col_idx, n, q_heads, group, scale_log2, dense);
}
// Dynamic shared memory of attn_fwd_wg<D>: as attn_fwd<D> plus 1024 bytes for the base alignment.

// S = Q K^T of one 64-key tile for a warpgroup: Q fragments `qf` in registers, the K tile through
// `k_desc`, the descriptor of its first byte (gmma_desc(tile, 16, 1024): 128B-swizzled, K-major);
// overwrites `s`; one commit group. The descriptors of the later k-steps add their byte offset >> 4
// to the start-address field (no carry out of it: shared addresses are below 256 KB), which keeps
// the descriptor arithmetic out of the loop (it was a fifth of the consumers' instructions).
template <int D>
__device__ __forceinline__ void wg_issue_s(float (*s)[4], const u32 (*qf)[4], u64 k_desc) {
    wgmma_fence();
    wgmma_m64n64k16<0, 0>(&s[0][0], qf[0], k_desc);  // the first step overwrites s
#pragma unroll
    for (int kk = 1; kk < D / 16; ++kk) {
        wgmma_m64n64k16<0>(&s[0][0], qf[kk], k_desc + (u64)(((kk >> 2) * (64 * 128) + (kk & 3) * 32) >> 4));
    }
    wgmma_commit();
}

// The same with Q in shared memory too (`q_desc` = gmma_desc(Q tile, 16, 1024), the K tile's layout):
// attn_fwd_ws3_d128, whose consumers' registers do not hold Q.
template <int D>
__device__ __forceinline__ void wg_issue_s_ss(float (*s)[4], u64 q_desc, u64 k_desc) {
    wgmma_fence();
    wgmma_m64n64k16_ss<0, 0>(&s[0][0], q_desc, k_desc);  // the first step overwrites s
#pragma unroll
    for (int kk = 1; kk < D / 16; ++kk) {
        const u64 off = (u64)(((kk >> 2) * (64 * 128) + (kk & 3) * 32) >> 4);
        wgmma_m64n64k16_ss<0>(&s[0][0], q_desc + off, k_desc + off);
    }
    wgmma_commit();
}

// O += P V of one 64-key tile for a warpgroup: P fragments `p` in registers, the V tile through
// `v_desc` = gmma_desc(tile, 64 * 128, 1024) (128B-swizzled, MN-major: D / 64 column blocks of 64 x 128
// bytes, 8-key groups 1024 bytes apart); one commit group.
// With SUM, also l += P 1 into the 4 accumulators `l` (the row sums of the same bf16 P), the ones
// through `ones_desc` = gmma_desc(ones, 16, 1024): an 8 x 64 K-major tile of bf16 1.0 (1 KB).
template <int D, bool SUM = false>
__device__ __forceinline__ void wg_issue_pv(float* o, const u32 (*p)[4], u64 v_desc, float* l = nullptr,
                                            u64 ones_desc = 0) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        if constexpr (D == 128) wgmma_m64n128k16<1>(o, p[kk], v_desc + (u64)((kk * 2048) >> 4));
        else wgmma_m64n64k16<1>(o, p[kk], v_desc + (u64)((kk * 2048) >> 4));
    }
    if constexpr (SUM) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma_m64n8k16<0>(l, p[kk], ones_desc + (u64)((kk * 32) >> 4));
    }
    wgmma_commit();
}

// Pipelined one-warpgroup variant (head_dim 128): three K/V stages, in FlashAttention-3's order. In
// iteration t the S = Q K^T wgmma of tile t+1 and the O += P V wgmma of tile t are both in flight while
// the softmax of tile t+1 runs; only the rescale of O waits for P V. P of tile t+1 goes to its own
// registers because the in-flight P V still reads P of tile t. The key positions of a tile are read
// one iteration before its loads, and a key block inside the sequence is loaded from one address with
// constant offsets. Q passes through the third V stage before the pipeline starts, so shared memory
// is 6 tiles + 3 x 64 positions + 1024 alignment bytes = 100,096 bytes (2 CTAs per SM). It replaced
// attn_fwd_wg2 (S of t+1 overlapped only the softmax, P V waited at once): 89.5 -> 72.5 ms sparse at
// 128K (H200, 2026-11-29).
template <int D>
__device__ __forceinline__ void attn_fwd_wg3(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                             const bf16_t* __restrict__ v, bf16_t* __restrict__ out,
                                             const u32* __restrict__ blk_off, const u32* __restrict__ blk_idx,
                                             const u32* __restrict__ col_off, const u32* __restrict__ col_idx,
                                             int n, int q_heads, int group, float scale_log2, int dense) {
    constexpr int BM = 64, BN = 64, NS = 3;
    constexpr int CPR = D / 8;
    constexpr int ROWS_PER_PASS = 128 / CPR;
    constexpr int PASSES = BM / ROWS_PER_PASS;
    constexpr int TILE_BYTES = BM * D * 2;

    extern __shared__ __align__(1024) unsigned char smem[];
    const u32 base = (smem_u32(smem) + 1023u) & ~1023u;
    unsigned char* gbase = smem + (base - smem_u32(smem));
    const u32 sK = base;
    const u32 sV = sK + NS * TILE_BYTES;
    const u32 sQ = sV + (NS - 1) * TILE_BYTES;  // V stage 2, before the pipeline starts
    int* kpos = (int*)(gbase + 2 * NS * TILE_BYTES);

    const int q_blocks = (n + BM - 1) / BM;
    const int id = blockIdx.x;
    // dense: heaviest query blocks of all heads first; index: one head's query blocks together (heaviest
    // first), since neighbouring query blocks of a head share most key blocks and columns (L2 reuse)
    const int qb = dense ? q_blocks - 1 - id / q_heads : q_blocks - 1 - id % q_blocks;
    const int h = dense ? id % q_heads : id / q_blocks;
    const int kvh = h / group;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int row0 = qb * BM;

    const bf16_t* qh = q + (u64)h * n * D;
    const bf16_t* kh = k + (u64)kvh * n * D;
    const bf16_t* vh = v + (u64)kvh * n * D;

    int nb, bstart = 0, cstart = 0, nc = 0;
    if (dense) {
        nb = (min(row0 + BM, n) - 1) / BN + 1;
    } else {
        const int e = h * q_blocks + qb;
        bstart = blk_off[e];
        nb = blk_off[e + 1] - bstart;
        cstart = col_off[e];
        nc = col_off[e + 1] - cstart;
    }
    const int ntiles = nb + (nc + BN - 1) / BN;

    const int g = lane >> 2, tq = lane & 3;
    const int ra = row0 + warp * 16 + g, rb = ra + 8;
    u32 qf[D / 16][4];
    {
        const int c = tid % CPR;
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const int r = tid / CPR + p * ROWS_PER_PASS;
            const int pos = row0 + r < n ? row0 + r : POS_NONE;
            const bool ok = pos != POS_NONE;
            cp_async16(sQ + swz128(r, c), qh + (ok ? (u64)pos * D + c * 8 : 0), ok ? 16 : 0);
        }
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int r = warp * 16 + (lane & 15);
            const int c = kk * 2 + (lane >> 4);
            ldsm_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], sQ + swz128(r, c));
        }
        __syncthreads();  // stage 2 of V is free again
    }

    // Key positions of this thread's rows of tile t (POS_NONE past the end), computed one iteration
    // before the loads that use them, so the index reads are off the critical path. A key block that
    // lies inside the sequence is described by its first position alone (`full`): its rows are
    // consecutive, so the loads use one address per operand with constant offsets.
    struct TilePos {
        int pos[PASSES];
        int base;
        bool full;
    };
    const int r0 = tid / CPR, c0 = tid % CPR;
    auto tile_pos = [&](int t, TilePos& tp) {
        const bool blockwise = t < nb;
        const int kb = blockwise ? (dense ? t : (int)blk_idx[bstart + t]) : 0;
        const int e0 = cstart + (t - nb) * BN;
        tp.base = kb * BN;
        tp.full = blockwise && kb * BN + BN <= n;
        if (!tp.full) {
#pragma unroll
            for (int p = 0; p < PASSES; ++p) {
                const int r = r0 + p * ROWS_PER_PASS;
                if (blockwise) {
                    tp.pos[p] = kb * BN + r < n ? kb * BN + r : POS_NONE;
                } else {
                    tp.pos[p] = e0 + r < cstart + nc ? (int)col_idx[e0 + r] : POS_NONE;
                }
            }
        }
    };
    auto load_tile = [&](int t, const TilePos& tp) {
        const int stage = t % NS;
        const u32 dk = sK + stage * TILE_BYTES + swz128(r0, c0), dv = sV + stage * TILE_BYTES + swz128(r0, c0);
        int* kp = kpos + stage * BN;
        if (tp.full) {
            const u64 off = (u64)(tp.base + r0) * D + c0 * 8;
            const bf16_t* ks = kh + off;
            const bf16_t* vs = vh + off;
#pragma unroll
            for (int p = 0; p < PASSES; ++p) {
                // rows r0 + 8p: the swizzle term (r & 7) is that of r0, so the offset is 1024 p
                cp_async16_full(dk + p * ROWS_PER_PASS * 128, ks + p * ROWS_PER_PASS * D);
                cp_async16_full(dv + p * ROWS_PER_PASS * 128, vs + p * ROWS_PER_PASS * D);
            }
            if (c0 == 0) {
#pragma unroll
                for (int p = 0; p < PASSES; ++p) kp[r0 + p * ROWS_PER_PASS] = tp.base + r0 + p * ROWS_PER_PASS;
            }
        } else {
#pragma unroll
            for (int p = 0; p < PASSES; ++p) {
                const bool ok = tp.pos[p] != POS_NONE;
                const u64 off = ok ? (u64)tp.pos[p] * D + c0 * 8 : 0;
                cp_async16(dk + p * ROWS_PER_PASS * 128, kh + off, ok ? 16 : 0);
                cp_async16(dv + p * ROWS_PER_PASS * 128, vh + off, ok ? 16 : 0);
                if (c0 == 0) kp[r0 + p * ROWS_PER_PASS] = tp.pos[p];
            }
        }
    };
    const u64 k_desc0 = gmma_desc(sK, 16, 1024), v_desc0 = gmma_desc(sV, 64 * 128, 1024);
    auto issue_s = [&](float (*s)[4], int t) { wg_issue_s<D>(s, qf, k_desc0 + (u64)((t % NS) * (TILE_BYTES >> 4))); };

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.f, l_b = 0.f;
    float s[8][4];
    u32 pa[4][4];

    auto softmax = [&](int t, u32 (*p)[4], float& al_a, float& al_b) {
        // positions ascend within a tile and missing rows are POS_NONE: only a tile whose last position
        // passes the block's first row needs the mask
        const int* kp = kpos + (t % NS) * BN;
        // f32 sums: with rounded ones ptxas serializes this kernel's wgmmas (C7513); it is a fallback
        // (head_dim 128 only, where the f32 sums were measured as accurate as SDPA)
        softmax_tile<exp2_emu<D>(), SUMS_F32>(s, kp, kp[BN - 1] > row0, ra, rb, tq, scale_log2, m_a, m_b, l_a, l_b, p,
                                    al_a, al_b);
    };

    TilePos nxt;
    if (ntiles > 0) {
        tile_pos(0, nxt);
        load_tile(0, nxt);
    }
    cp_async_commit();
    if (ntiles > 1) {
        tile_pos(1, nxt);
        load_tile(1, nxt);
    }
    cp_async_commit();
    if (ntiles > 2) tile_pos(2, nxt);
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();
    if (ntiles > 0) {
        issue_s(s, 0);
        wgmma_wait0();
        float al_a, al_b;
        softmax(0, pa, al_a, al_b);  // O is zero: no rescale
    }

    // every iteration but the last has a tile t+1 (peeled, so that ptxas sees one wgmma pipeline shape
    // and does not serialize the wgmmas)
    for (int t = 0; t + 1 < ntiles; ++t) {
        // here: P of tile t is in pa, O holds tiles < t, tile t is in stage t % NS
        if (t + 2 < ntiles) load_tile(t + 2, nxt);  // its stage held tile t - 1, freed by the last barrier
        cp_async_commit();
        if (t + 3 < ntiles) tile_pos(t + 3, nxt);
        cp_async_wait<1>();  // tile t+1 is in
        fence_proxy_async();
        __syncthreads();
        issue_s(s, t + 1);
        wg_issue_pv<D>(&o[0][0], pa, v_desc0 + (u64)((t % NS) * (TILE_BYTES >> 4)));
        u32 pn[4][4];
        float al_a, al_b;
        wgmma_wait<1>();                   // S of tile t+1 is done
        softmax(t + 1, pn, al_a, al_b);  // while P V of tile t runs
        wgmma_wait0();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) reg_fence4(pa[kk]);  // P of tile t stays live until here
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            o[i][0] *= al_a;
            o[i][1] *= al_a;
            o[i][2] *= al_b;
            o[i][3] *= al_b;
        }
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            pa[kk][0] = pn[kk][0];
            pa[kk][1] = pn[kk][1];
            pa[kk][2] = pn[kk][2];
            pa[kk][3] = pn[kk][3];
        }
        __syncthreads();  // stage t % NS is free for the load of tile t + 3
    }
    if (ntiles > 0) {
        wg_issue_pv<D>(&o[0][0], pa, v_desc0 + (u64)(((ntiles - 1) % NS) * (TILE_BYTES >> 4)));
        wgmma_wait0();
    }
    cp_async_wait<0>();

    store_rows<D>(o, l_a, l_b, out + (u64)h * n * D, ra, rb, n, tq);
}

extern "C" __global__ void __launch_bounds__(128, 2) attn_fwd_wg3_d128(ATTN_ARGS) {
    attn_fwd_wg3<128>(q, k, v, out, blk_off, blk_idx, col_off, col_idx, n, q_heads, group, scale_log2, dense);
}
// The tile order of the warp-specialized kernels (docs/cuda.md, "Tile sequence" and "Deadlock rule")
// for NC query blocks qb0 .. qb0 + NC - 1 of head h (with pair_heads: block qb0 of heads h and h1):
// the union of their key-block lists in ascending order, each tile tagged with the warpgroups that
// compute it (bit w), then the column tiles (with a union list, one sequence for all, tagged UNI);
// a warpgroup passed by FORCE = NS - NC tiles in a row while it has tiles left gets its next one out
// of order, and the tile after a warpgroup's last carries DONE << w. The producer of the `_merge`
// kernels runs it in line (sparse runs without a schedule), `ws_schedule` ahead of the launch for the
// other variant (which takes dense runs in the same order by a formula).
// Every lane of a warp runs it with the same result; lanes only differ in the list entries they hold.
template <int NC, int NS>
struct TileMerge {
    static constexpr int NONE = 0x7fffffff;
    // tag bits: 1 << w warpgroup w computes the tile; DONE << w it has no tile from this one on; END no
    // more tiles; UNI a column tile of the group's union list (each warpgroup masks the others' columns)
    static constexpr int DONE = 8, END = 64, UNI = 128, FORCE = NS - NC;
    // With three consumers lane l of chunk[w] holds entry 32 k + l of list w (k = ib[w] / 32) and
    // nchunk[w] entry 32 (k + 1) + l, loaded when the chunk before is taken up, i.e. 32 entries ahead:
    // one entry ahead left three consumers waiting for tiles (16% of their stall samples on the `full`
    // barrier at head_dim 64, 128K, against 3.5% in dense runs; chunks took 2.4-2.8% off sparse
    // attention there), while at head_dim 128 the chunks' shuffles cost 1% (2026-11-30). With two,
    // vb[w] is the next entry and nb[w] the one after, loaded one tile ahead.
    static constexpr bool CHUNKS = NC == 3;
    const u32* blk_idx;
    bool dense, uni, shared_cols;
    int lane, live;
    // per warpgroup: its key-block list (off, len), its column list (coff, clen; with a shared union
    // list warpgroup 0's holds it), ct its column tiles and jc those taken, vb its next block and ib
    // that block's place in the list, since the tiles since its last own tile (negative before its
    // first)
    int off[NC], len[NC], coff[NC], clen[NC], ct[NC], jc[NC], vb[NC], nb[NC], chunk[NC], nchunk[NC], ib[NC],
        since[NC];
    int done;  // bit w: warpgroup w has no tile left
    int pend;  // DONE bits for the next tile

    __device__ __forceinline__ int block(int w, int i) const {
        return i < len[w] ? (dense ? i : (int)blk_idx[off[w] + i]) : NONE;
    }
    __device__ __forceinline__ int entry(int w, int i) const {  // i in warpgroup w's current chunk
        return dense ? (i < len[w] ? i : NONE) : __shfl_sync(0xffffffff, chunk[w], i & 31);
    }
    // whether warpgroup w still has column tiles (with a shared union list, warpgroup 0's)
    __device__ __forceinline__ bool cols_left(int w) const {
        return shared_cols && w > 0 ? (live >> w & 1) && jc[0] < ct[0] : jc[w] < ct[w];
    }

    // The lists of the group: `qb(w)` is warpgroup w's query block and `hw(w)` its head; `uni_`: the
    // columns come as the union list of ix_group_union, whose lengths (one per group) are `ucol_len`.
    template <class QB, class HW>
    __device__ __forceinline__ void init_lists(QB qb, HW hw, int qb0, int q_blocks, int is_dense,
                                               const u32* __restrict__ blk_off, const u32* __restrict__ col_off,
                                               const u32* __restrict__ ucol_len, bool uni_, int h, int lane_) {
        dense = is_dense;
        uni = uni_;
        lane = lane_;
        live = (1 << min(NC, q_blocks - qb0)) - 1;
        shared_cols = uni && live > 1;
#pragma unroll
        for (int w = 0; w < NC; ++w) {
            off[w] = len[w] = coff[w] = clen[w] = 0;
            const int b = qb(w);
            if (b >= q_blocks) continue;
            if (dense) {  // the key blocks 0..=b of a causal block
                len[w] = b + 1;
            } else {
                const int e = hw(w) * q_blocks + b;
                off[w] = blk_off[e];
                len[w] = blk_off[e + 1] - off[w];
                coff[w] = col_off[e];
                clen[w] = col_off[e + 1] - coff[w];
            }
        }
        if (uni) {
            clen[0] = (int)ucol_len[h * ((q_blocks + NC - 1) / NC) + qb0 / NC];
#pragma unroll
            for (int w = 1; w < NC; ++w) clen[w] = 0;
        }
    }

    // The merge's state, after init_lists.
    __device__ __forceinline__ void init_merge(const u32* __restrict__ blk_idx_) {
        blk_idx = blk_idx_;
        done = pend = 0;
#pragma unroll
        for (int w = 0; w < NC; ++w) {
            if constexpr (CHUNKS) {
                chunk[w] = dense ? 0 : block(w, lane);
                nchunk[w] = dense ? 0 : block(w, 32 + lane);
                vb[w] = entry(w, 0);
            } else {
                vb[w] = block(w, 0);
                nb[w] = block(w, 1);
            }
            ib[w] = jc[w] = 0;
            ct[w] = (clen[w] + 63) / 64;
            since[w] = -(1 << 30);
        }
#pragma unroll
        for (int w = 0; w < NC; ++w) done |= (vb[w] == NONE && !cols_left(w)) << w;
    }

    __device__ __forceinline__ bool finished() const { return done == (1 << NC) - 1; }

    // The next tile: a key block (kb >= 0, colw = -1) or a column tile of warpgroup colw (kb = -1;
    // 0 for a shared union list); returns its tag.
    __device__ __forceinline__ int next(int& kb, int& colw) {
        // the warpgroup passed by the most tiles, once that reaches FORCE, gets the next one
        int force = -1, most = FORCE - 1;
#pragma unroll
        for (int w = 0; w < NC; ++w) {
            if (!(done >> w & 1) && since[w] > most) {
                force = w;
                most = since[w];
            }
        }
        kb = colw = -1;
        if (force >= 0) {
            int vf = vb[0];
#pragma unroll
            for (int w = 1; w < NC; ++w) vf = force == w ? vb[w] : vf;
            if (vf != NONE) kb = vf; else colw = force;
        } else {
            int first = vb[0];
#pragma unroll
            for (int w = 1; w < NC; ++w) first = min(first, vb[w]);
            if (first != NONE) {
                kb = first;
            } else {  // the warpgroup with the fewest column tiles taken, among those with some left
                int fewest = 1 << 30;
#pragma unroll
                for (int w = 0; w < NC; ++w) {
                    if (jc[w] < ct[w] && jc[w] < fewest) {
                        colw = w;
                        fewest = jc[w];
                    }
                }
            }
        }
        if (uni) colw = colw < 0 ? colw : 0;  // one column sequence, for all
        int tag = 0;
        if (kb >= 0) {
#pragma unroll
            for (int w = 0; w < NC; ++w) {
                if (vb[w] == kb) {
                    tag |= 1 << w;
                    const int i = ++ib[w];
                    if constexpr (CHUNKS) {
                        if ((i & 31) == 0 && !dense) {
                            chunk[w] = nchunk[w];
                            nchunk[w] = block(w, i + 32 + lane);
                        }
                        vb[w] = entry(w, i);
                    } else {
                        vb[w] = nb[w];
                        nb[w] = block(w, i + 1);
                    }
                }
            }
        } else {
            tag = shared_cols ? live | UNI : 1 << colw;
#pragma unroll
            for (int w = 0; w < NC; ++w) jc[w] += colw == w;
        }
#pragma unroll
        for (int w = 0; w < NC; ++w) since[w] = (tag >> w) & 1 ? 0 : since[w] + 1;
        tag |= pend;
        pend = 0;
#pragma unroll
        for (int w = 0; w < NC; ++w) {
            if (!(done >> w & 1) && vb[w] == NONE && !cols_left(w)) {
                done |= 1 << w;
                pend |= DONE << w;
            }
        }
        return tag;
    }
};

// A schedule entry (ws_schedule, read by attn_fwd_ws): the tile's key block in the low 24 bits
// (SCHED_COLUMN for a column tile; blocks stay below it for n < 2^30 - 64), its tag in the top 8.
#define SCHED_COLUMN 0xffffffu

// Where the schedule of the group whose first query block is entry e0 (= h * q_blocks + qb0) starts:
// past the space of every group before it. A group has at most one tile per list entry and per column
// tile of its blocks, plus END: sum(len) + sum(ceil(clen / 64)) + 1 entries (with a union list no more
// column tiles than without). Over the group's `live` lists, sum(ceil(clen / 64)) is at most the
// difference of col_off / 64 (rounded down) plus live, so the difference of this offset to the next
// group's covers it with 2 e0 already; 3 e0 leaves an entry per list to spare (host test
// `tile_schedules_fit_their_space`, with the host's buffer length `sched_len`).
__device__ __forceinline__ u64 sched_base(const u32* __restrict__ blk_off, const u32* __restrict__ col_off,
                                          int e0) {
    return (u64)blk_off[e0] + col_off[e0] / 64 + 3 * (u64)e0;
}

// The tile order of every group of NC query blocks of every head, for the warp-specialized kernel's
// producer to read instead of merging the lists itself (sparse runs; docs/cuda.md, "Schedules"). One
// warp per group runs TileMerge and writes its entries 32 at a time, then END.
template <int NC, int NS>
__device__ __forceinline__ void ws_schedule(const u32* __restrict__ blk_off, const u32* __restrict__ blk_idx,
                                            const u32* __restrict__ col_off, const u32* __restrict__ ucol_len,
                                            int n, int q_heads, int use_union, u32* __restrict__ sched) {
    const int lane = threadIdx.x & 31;
    const int gw = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    const int q_blocks = (n + 63) / 64, q_groups = (q_blocks + NC - 1) / NC;
    if (gw >= q_heads * q_groups) return;
    const int h = gw / q_groups, qb0 = NC * (gw % q_groups);
    TileMerge<NC, NS> m;
    m.init_lists([&](int w) { return qb0 + w; }, [&](int) { return h; }, qb0, q_blocks, 0, blk_off, col_off,
                 ucol_len, use_union != 0, h, lane);
    m.init_merge(blk_idx);
    u32* out = sched + sched_base(blk_off, col_off, h * q_blocks + qb0);
    u32 keep = 0;  // lane l: entry 32 k + l of the current run of 32
    int t = 0;
    for (; !m.finished(); ++t) {
        int kb, colw;
        const int tag = m.next(kb, colw);
        if (lane == (t & 31)) keep = (kb >= 0 ? (u32)kb : SCHED_COLUMN) | (u32)tag << 24;
        if ((t & 31) == 31) out[t - 31 + lane] = keep;
    }
    if (lane == (t & 31)) keep = SCHED_COLUMN | (u32)TileMerge<NC, NS>::END << 24;
    if (lane <= (t & 31)) out[(t & ~31) + lane] = keep;
}

// Warp-specialized variant: one CTA takes NC neighbouring query blocks, NC p .. NC p + NC - 1, of one
// head (NC = 2: 384 threads, head_dim 128 and, with ATTNPLAN_ATTN=ws2, 64; NC = 3: 512 threads,
// head_dim 64, as FlashAttention-3 takes 192 query rows there). Warpgroup NC is the producer: it walks
// the CTA's tile sequence and loads each K/V tile once into a ring of NS stages (below). Warpgroup w
// (warps 4w..4w+3) computes block NC p + w with the pipeline of attn_fwd_wg3 over its own tiles only,
// and arrives on the stage's `empty` mbarrier when it is done with a tile (at once for a tile that is
// not its own). Loading K/V once for 128 query rows halves the L2-to-shared traffic per cell, which
// limited the one-warpgroup kernels (403 TFLOP/s with their loads, 620 with the loads left out; H200,
// 2026-11-29), and the consumers issue no loads and meet no CTA-wide barrier.
//
// Tile sequence (the producer's): the union of the blocks' key-block lists, merged in order, each
// tile tagged with the warpgroups whose list holds it (dense: the key blocks 0..=last of each block,
// the last ones for the later warpgroups only); then the column tiles: with use_union (set by the
// host unless turned off or the heads are paired), the tiles of the group's union list
// (ix_group_union), each for every warpgroup whose block exists and tagged UNI, every warpgroup seeing
// the other blocks' columns as POS_NONE in its own position list (so a UNI tile is always masked);
// otherwise the blocks' own column tiles, the warpgroup with the fewest taken first; then an END
// marker. A warpgroup holds its current tile (its P V runs after the next tile's S) while it waits
// for its next one, so it may wait at most NS - 1 tiles ahead, or the producer, needing that stage,
// would never deliver. The producer therefore takes a warpgroup's next tile out of order (a block then
// shared by several lists may be loaded twice) once FORCE = NS - NC tiles in a row have passed it,
// the one passed by the most first: with two warpgroups only one can be owed a tile at a time; with
// three, two can, and the second waits one tile more, NS - 2 at most (scripts/gpu/ws-schedule.py
// checks both). A warpgroup's last tile is followed by a tile tagged DONE for it; after finishing, it
// releases the remaining tiles without computing them. Each warpgroup computes exactly the cells of
// its own index.
//
// Registers: NC = 2: the launch bound caps the CTA at 168 per thread; the producer gives back to 40
// and the consumers take 232 (setmaxnreg), as FlashAttention-3 does. NC = 3: 128 at entry, producer
// 56, consumers 152 (65,536 in all).
// Shared memory, NC = 2: NS = 6 K and V stages, a 1 KB tile of ones, 2 NS x 64 positions, NS tags
// (8-byte slots), 2 NS + 1 mbarriers and 1024 alignment bytes = 201,880 bytes at head_dim 128 (one
// CTA per SM, 12 warps). The two Q tiles pass through the last stage (warpgroup 0's in its K slot,
// 1's in its V slot) before the pipeline reaches it: the producer waits on the `qfree` mbarrier
// (count 256) before its first write there, and each consumer thread arrives on it once its Q
// fragments are in registers. That sixth stage (the fifth had cost the Q tiles' 32 KB) lets one more
// tile be in flight: the consumers had waited for tiles (27 polls of the `full` barrier per tile at
// 128K, H200, 2026-11-29). NC = 3 at head_dim 64: NS = 11 stages of 16 KB, then the three Q tiles
// (24 KB), the ones tile and 3 NS x 64 positions: 215,568 bytes; at head_dim 128 (since 2026-11-30):
// NS = 5 stages of 32 KB, the three Q tiles (48 KB), no ones tile: 219,008 bytes.
template <int D, int NC, bool MERGE>
__device__ __forceinline__ void attn_fwd_ws(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                            const bf16_t* __restrict__ v, bf16_t* __restrict__ out,
                                            const u32* __restrict__ blk_off, const u32* __restrict__ blk_idx,
                                            const u32* __restrict__ col_off, const u32* __restrict__ col_idx,
                                            int n, int q_heads, int group, float scale_log2, int dense,
                                            const TmaDesc& tmk, const TmaDesc& tmv, int pair_heads,
                                            const u32* __restrict__ ucol_idx, const u32* __restrict__ ucol_len,
                                            int use_union, const u32* __restrict__ sched, int interleave) {
    static_assert(NC == 2 || NC == 3, "two or three consumer warpgroups");
    // With two consumers their Q tiles pass through the last of 6 stages; with three Q has its own
    // tiles after the stages (11 at head_dim 64: 8 were 1% slower on sparse layers, 2026-11-30).
    constexpr bool Q_IN_STAGE = NC == 2;
    // Three consumers at head_dim 128 (attn_fwd_ws3_d128, the default there) keep Q in shared memory
    // (S by wgmma with both operands there): their 152 registers do not hold Q besides O, S and two P.
    // Five stages fit beside the three Q tiles.
    constexpr bool Q_SMEM = D == 128 && NC == 3;
    constexpr int BM = 64, BN = 64, NS = NC == 2 ? 6 : (D == 64 ? 11 : 5);
    constexpr int TILE_BYTES = BM * D * 2;
    // tag bits (TileMerge): member 1 << w, DONE << w, END, UNI
    constexpr int DONE = TileMerge<NC, NS>::DONE, END = TileMerge<NC, NS>::END, UNI = TileMerge<NC, NS>::UNI;

    extern __shared__ __align__(1024) unsigned char smem[];
    const u32 base = (smem_u32(smem) + 1023u) & ~1023u;
    unsigned char* gbase = smem + (base - smem_u32(smem));
    const u32 sK = base;
    const u32 sV = sK + NS * TILE_BYTES;
    // warpgroup w's Q tile: sQ + w * q_step (in the last stage's K and V slots, or after the stages)
    const u32 sQ = Q_IN_STAGE ? sK + (NS - 1) * TILE_BYTES : sK + 2 * NS * TILE_BYTES;
    const u32 q_step = Q_IN_STAGE ? sV - sK : TILE_BYTES;
    // with MMA sums, a 1 KB tile of ones after the stages and Q (wg_issue_pv's `ones_desc`)
    constexpr bool MMA_SUMS = sums_mode<D>(true) == SUMS_MMA;
    constexpr u32 ONES_AT = (2 * NS + (Q_IN_STAGE ? 0 : NC)) * TILE_BYTES;
    const u32 sOnes = sK + ONES_AT;
    int* kpos = (int*)(gbase + ONES_AT + (MMA_SUMS ? 1024 : 0));
    // kpos: per stage, the key positions of the tile as each warpgroup sees them (NC x BN: they differ
    // only in a union column tile, where the other block's columns are POS_NONE)
    int* ktag = kpos + NC * NS * BN;  // bit w: warpgroup w computes the tile; END: no more tiles
    const u32 full = smem_u32(ktag + 2 * NS);  // NS mbarriers (8-byte aligned), then NS `empty` ones
    const u32 empty = full + 8 * NS;
    const u32 qfree = empty + 8 * NS;  // every Q tile is in registers

    // Warpgroup w computes query block qb0 + w of head h: neighbouring query blocks of one head. With
    // pair_heads (two consumers only: two heads of one KV group with identical indexes, group even)
    // warpgroup 0 computes query block qb0 of head h and warpgroup 1 the same block of head h1 = h + 1,
    // whose tiles are then all shared.
    const bool paired = NC == 2 && pair_heads;
    const int q_blocks = (n + BM - 1) / BM;
    const int id = blockIdx.x;
    int h, h1, qb0;
    if (paired) {  // head-major, heaviest query block first (indexed runs only)
        h = 2 * (id / q_blocks);
        h1 = h + 1;
        qb0 = q_blocks - 1 - id % q_blocks;
    } else {
        // dense runs, and indexed ones the host interleaves (their K and V fit in L2): the heaviest
        // groups of all heads first; other indexed runs head-major, heaviest group first
        const int q_groups = (q_blocks + NC - 1) / NC;
        const bool across = dense || interleave;
        const int pr = across ? q_groups - 1 - id / q_heads : q_groups - 1 - id % q_groups;
        h = h1 = across ? id % q_heads : id / q_groups;
        qb0 = NC * pr;
    }
    auto qb_of = [&](int w) { return paired ? qb0 : qb0 + w; };
    const int kvh = h / group;
    // the warp index through a shuffle, so that ptxas knows it is warp-uniform
    const int tid = threadIdx.x, warp = __shfl_sync(0xffffffff, tid >> 5, 0), lane = tid & 31;

    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < NS; ++s) {
            mbar_init(full + 8 * s, 128);  // the producer's threads
            mbar_init(empty + 8 * s, 128 * NC);  // the consumers' threads
        }
        mbar_init(qfree, 128 * NC);
    }
    __syncthreads();

    if (warp >= 4 * NC) {
        // ---- producer ----
        if constexpr (NC == 2) {
            asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        } else {
            asm volatile("setmaxnreg.dec.sync.aligned.u32 56;");
        }
        const bf16_t* kh = k + (u64)kvh * n * D;
        const bf16_t* vh = v + (u64)kvh * n * D;
        // The tile order. MERGE: the producer merges the lists itself (TileMerge; every producer thread
        // the same, no barrier couples them; reading the lists through shared memory instead of
        // straight from global memory made no difference, 74.2 vs 73.4 ms at 128K). Otherwise a sparse
        // run reads the schedule ws_schedule wrote before the launch, 32 entries ahead (lane l of sc
        // holds entry 32 k + l, of sn entry 32 (k + 1) + l), and a dense one takes key blocks 0..=dlast
        // in order, block t for every warpgroup whose query block is at or past it, DONE << w on the
        // tile after w's last (no warpgroup is ever passed: no forcing). The host runs dense attention
        // of two consumers on the MERGE variant (1.5% faster at head_dim 128, same consumers).
        const bool uni = use_union && !dense && !paired;
        TileMerge<NC, NS> m;
        m.init_lists(qb_of, [&](int w) { return w ? h1 : h; }, qb0, q_blocks, dense, blk_off, col_off, ucol_len,
                     uni, h, lane);
        u64 sbase = 0;
        u32 sc = 0, sn = 0;
        int dlast = -1;
        if constexpr (MERGE) {
            m.init_merge(blk_idx);
        } else if (dense) {
#pragma unroll
            for (int w = 0; w < NC; ++w) dlast = qb_of(w) < q_blocks ? max(dlast, qb_of(w)) : dlast;
        } else {  // never paired (the host's choice)
            sbase = sched_base(blk_off, col_off, h * q_blocks + qb0);
            sc = sched[sbase + lane];
            sn = sched[sbase + 32 + lane];
        }
        const u32* cidx = uni ? ucol_idx : col_idx;
        const int pt = tid - 128 * NC;
        auto column = [&](int off, int len, int e) { return e < len ? (int)cidx[off + e] : POS_NONE; };
        // Column lists are loaded one tile ahead: per warpgroup c0, c1 the positions of its next column
        // tile (rows `lane` and `32 + lane`, shuffled to the rows a thread copies; m.jc counts the tiles
        // taken). A column tile serves one warpgroup, so two of them must be issued per tile time; with
        // the loads in line the producer fell behind.
        int c0[NC], c1[NC];
#pragma unroll
        for (int w = 0; w < NC; ++w) {
            m.jc[w] = 0;
            c0[w] = column(m.coff[w], m.clen[w], lane);
            c1[w] = column(m.coff[w], m.clen[w], 32 + lane);
        }

        // thread: rows lr + RS j (j < BN / RS) and 16-byte chunk lc of each tile (RS = 8 for D = 128, 16 for
        // D = 64); with the row's low bits fixed, the 128B swizzle is a per-thread constant
        constexpr int RS = 128 / (D / 8);
        const int lr = pt % RS, lc = pt / RS;
        const u32 sw = (u32)(lc >> 3) * (64 * 128) + (u32)(((lc & 7) ^ (lr & 7)) << 4) + lr * 128;
        // Announcing a tile on the stage's `full` barrier (count 128, one arrival per producer thread;
        // each arrival also releases that thread's tag and position writes):
        // - a key block is loaded by TMA (thread 0: 64 x 64 boxes, D / 64 each of K and V, rows past n
        //   zero-filled; its arrival carries the tile's expected transaction bytes), so the phase completes
        //   when the bytes have landed;
        // - a column tile is gathered with cp.async by all threads, each of which adds
        //   cp.async.mbarrier.arrive (the phase cannot complete before its copies land).
        // The producer thus never waits for its own loads and runs up to NS tiles ahead; most tiles
        // cost it a few instructions instead of 16 cp.async per thread.
        int t = 0;
        for (;; ++t) {
            int kb, colw, tag;
            if constexpr (MERGE) {
                if (m.finished()) break;
                tag = m.next(kb, colw);
            } else if (dense) {
                if (t > dlast) break;
                kb = t;
                colw = -1;
                tag = 0;
#pragma unroll
                for (int w = 0; w < NC; ++w) {
                    const int b = qb_of(w);
                    if (b < q_blocks) tag |= (t <= b ? 1 << w : 0) | (t == b + 1 ? DONE << w : 0);
                }
            } else {
                const u32 e = __shfl_sync(0xffffffff, sc, t & 31);
                if ((t & 31) == 31) {
                    sc = sn;
                    sn = sched[sbase + t + 33 + lane];
                }
                tag = (int)(e >> 24);
                if (tag & END) break;
                kb = (e & SCHED_COLUMN) == SCHED_COLUMN ? -1 : (int)(e & SCHED_COLUMN);
                colw = kb >= 0 ? -1 : (tag & UNI ? 0 : __ffs(tag & ((1 << NC) - 1)) - 1);
#pragma unroll
                for (int w = 0; w < NC; ++w) m.jc[w] += colw == w;
            }
            const int s = t % NS, u = t / NS;
            if (u > 0) mbar_wait(empty + 8 * s, (u - 1) & 1);
            if (Q_IN_STAGE && t == NS - 1) mbar_wait(qfree, 0);  // the last stage still holds the Q tiles
            int* kp = kpos + NC * s * BN;  // warpgroup 0's positions, then 1's (then 2's)
            if (pt == 0) ktag[s] = tag;
            const u32 fb = full + 8 * s;
            if (kb >= 0) {
                if (lc == 0) {
#pragma unroll
                    for (int j = 0; j < BN / RS; ++j) {
                        const int r = kb * BN + lr + RS * j;
#pragma unroll
                        for (int w = 0; w < NC; ++w) kp[w * BN + lr + RS * j] = r < n ? r : POS_NONE;
                    }
                }
                if (pt == 0) {  // after its own tag and position writes: its arrival releases them
                    mbar_arrive_expect_tx(fb, 2 * TILE_BYTES);
                    const u32 k_st = sK + s * TILE_BYTES, v_st = sV + s * TILE_BYTES;
#pragma unroll
                    for (int c = 0; c < D / 64; ++c) {
                        tma_load_3d(k_st + c * (64 * 128), &tmk, 64 * c, kb * BN, kvh, fb);
                        tma_load_3d(v_st + c * (64 * 128), &tmv, 64 * c, kb * BN, kvh, fb);
                    }
                } else {
                    mbar_arrive(fb);
                }
            } else {
                const u32 dk = sK + s * TILE_BYTES + sw, dv = sV + s * TILE_BYTES + sw;
                // row lr + RS j sits in lane (lr + RS j) % 32 of the first register for j < 32 / RS
                int s0 = c0[0], s1 = c1[0];
#pragma unroll
                for (int w = 1; w < NC; ++w) {
                    s0 = colw == w ? c0[w] : s0;
                    s1 = colw == w ? c1[w] : s1;
                }
                int pos[BN / RS];
#pragma unroll
                for (int j = 0; j < BN / RS; ++j)
                    pos[j] = __shfl_sync(0xffffffff, j < 32 / RS ? s0 : s1, (lr + RS * j) & 31);
#pragma unroll
                for (int w = 0; w < NC; ++w) {
                    if (colw == w) {  // the warpgroup's next column tile
                        c0[w] = column(m.coff[w], m.clen[w], m.jc[w] * BN + lane);
                        c1[w] = column(m.coff[w], m.clen[w], m.jc[w] * BN + 32 + lane);
                    }
                }
                // a union entry: the token in the low 32 - NC bits, its blocks in the top NC (moved to
                // bits NC j .. NC j + NC - 1 of `blocks`)
                constexpr int TB = 32 - NC;
                u32 blocks = 0xffffffffu;
                if (uni) {
#pragma unroll
                    for (int j = 0; j < BN / RS; ++j) {
                        if (pos[j] != POS_NONE) {
                            blocks ^= (~(u32)pos[j] >> TB) << (NC * j);
                            pos[j] &= (1u << TB) - 1;
                        }
                    }
                }
#pragma unroll
                for (int j = 0; j < BN / RS; ++j) {
                    const bool ok = pos[j] != POS_NONE;
                    const u64 off = ok ? (u64)pos[j] * D + lc * 8 : 0;
                    cp_async16(dk + j * (RS * 128), kh + off, ok ? 16 : 0);
                    cp_async16(dv + j * (RS * 128), vh + off, ok ? 16 : 0);
                }
                if (lc == 0) {
#pragma unroll
                    for (int j = 0; j < BN / RS; ++j) {
#pragma unroll
                        for (int w = 0; w < NC; ++w)
                            kp[w * BN + lr + RS * j] = blocks >> (NC * j + w) & 1u ? pos[j] : POS_NONE;
                    }
                }
                cp_async_mbar_arrive(fb);
                mbar_arrive(fb);
            }
        }
        const int s = t % NS, u = t / NS;
        if (u > 0) mbar_wait(empty + 8 * s, (u - 1) & 1);
        if (pt == 0) ktag[s] = END;
        mbar_arrive(full + 8 * s);
        cp_async_wait<0>();  // no copy outlives its thread
    } else {
    // ---- consumers ----
    if constexpr (NC == 2) {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 152;");
    }
    const int wg = warp >> 2, wl = warp & 3;
    const int hw = wg ? h1 : h;       // this warpgroup's head
    const int row0 = qb_of(wg) * BM;  // and first row
    const int g = lane >> 2, tq = lane & 3;
    const int ra = row0 + wl * 16 + g, rb = ra + 8;
    const bf16_t* qh = q + (u64)hw * n * D;
    u32 qf[D / 16][4];
    {
        const int ct = tid & 127, c = ct % (D / 8);
        const u32 sq = sQ + wg * q_step;
#pragma unroll
        for (int p = 0; p < BM * (D / 8) / 128; ++p) {
            const int r = ct / (D / 8) + p * (128 / (D / 8));
            const int pos = row0 + r < n ? row0 + r : POS_NONE;
            const bool ok = pos != POS_NONE;
            cp_async16(sq + swz128(r, c), qh + (ok ? (u64)pos * D + c * 8 : 0), ok ? 16 : 0);
        }
        cp_async_commit();
        if (MMA_SUMS) {
            // both warpgroups write the ones tile whole (the same bytes), so that each needs only its
            // own barrier; the fence makes the writes visible to wgmma (the async proxy)
            const u32 one2 = 0x3f803f80u;  // two bf16 1.0
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};" ::"r"(sOnes + (u32)(tid & 63) * 16), "r"(one2)
                         : "memory");
            fence_proxy_async();
        }
        cp_async_wait<0>();
        if (Q_SMEM) fence_proxy_async();  // the copies are read by wgmma (the async proxy)
        named_bar_sync(1 + wg, 128);
        if (!Q_SMEM) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const int r = wl * 16 + (lane & 15);
                const int c2 = kk * 2 + (lane >> 4);
                ldsm_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], sq + swz128(r, c2));
            }
        }
        mbar_arrive(qfree);  // the producer may now fill the last stage (two consumers)
    }

    // Tiles are followed by their stage (ts) and the parity of its phase (tph), kept incrementally
    // (NS = 6 makes t % NS and t / NS a handful of instructions each).
    int ts = -1, tph = 0;
    auto advance = [&]() {
        if (++ts == NS) {
            ts = 0;
            tph ^= 1;
        }
    };
    int klast = 0;  // the last key position of the tile next_member returned (read with its tag)
    // The stage of this warpgroup's next tile (-1 at END or at its DONE tag, which it does not release
    // yet); the tiles that are not its own are released on the way.
    auto next_member = [&]() -> int {
        for (;;) {
            advance();
            mbar_wait(full + 8 * ts, tph);
            const int tag = ktag[ts];
            // a union tile has holes (the other block's columns): always masked. The position is read
            // whatever the tag (a load predicated on the tag waited for it: dense attention lost 4%)
            klast = max(kpos[(NC * ts + wg) * BN + BN - 1], tag & UNI ? POS_NONE : -1);
            if (tag & (END | (DONE << wg))) return -1;
            if ((tag >> wg) & 1) return ts;
            mbar_arrive(empty + 8 * ts);
        }
    };
    // every consumer thread arrives: a branch on the lane here would make ptxas serialize the wgmmas
    auto release = [&](int st) { mbar_arrive(empty + 8 * st); };
    const u64 k_desc0 = gmma_desc(sK, 16, 1024), v_desc0 = gmma_desc(sV, 64 * 128, 1024);
    const u64 q_desc = gmma_desc(sQ + wg * q_step, 16, 1024);  // Q_SMEM
    auto issue_s = [&](float (*s)[4], int st) {
        const u64 kd = k_desc0 + (u64)(st * (TILE_BYTES >> 4));
        if constexpr (Q_SMEM) wg_issue_s_ss<D>(s, q_desc, kd);
        else wg_issue_s<D>(s, qf, kd);
    };
    const u64 ones_desc = gmma_desc(sOnes, 16, 1024);
    float lsum[4] = {0.f, 0.f, 0.f, 0.f};  // MMA_SUMS: rows ra (0, 1) and rb (2, 3), each the whole row's sum
    auto issue_pv = [&](float* o, u32 (*p)[4], int st) {
        wg_issue_pv<D, MMA_SUMS>(o, p, v_desc0 + (u64)(st * (TILE_BYTES >> 4)), lsum, ones_desc);
    };

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.f, l_b = 0.f;
    float s[8][4];
    u32 pa[4][4];
    // two consumers: the quads' row maxima only when a row of the warp moves (softmax_tile's
    // LAZY_SHFL), whose vote then also decides the rescale of O (1.5-4% faster sparse at head_dim
    // 128); three: both on every tile, as before (the vote cost 1-1.5% at head_dim 64, 32K)
    constexpr bool LAZY = NC == 2;
    auto softmax = [&](int st, int last, u32 (*p)[4], float& al_a, float& al_b) -> bool {
        // positions ascend within a tile and missing rows are POS_NONE: only a tile whose last position
        // passes the block's first row needs the mask
        return softmax_tile<exp2_emu<D>(), sums_mode<D>(true), LAZY>(s, kpos + (NC * st + wg) * BN, last > row0, ra, rb, tq, scale_log2, m_a, m_b, l_a, l_b,
                                    p, al_a, al_b);
    };

    int cur = next_member();
    if (cur >= 0) {
        issue_s(s, cur);
        wgmma_wait0();
        float al_a, al_b;
        softmax(cur, klast, pa, al_a, al_b);  // O is zero: no rescale
    }
    // P of tile `cur` is in pa; S of the next tile and P V of `cur` run while the softmax of the next one
    // does. This loop shape (counted bound, never reached, with breaks; the wgmmas outside any branch)
    // is one that ptxas keeps asynchronous: a loop condition calling next_member, a wgmma in a branch of
    // the body or an early exit from next_member without a wait made it serialize them (C7513).
    for (int it = 0; it < (1 << 30); ++it) {
        if (cur < 0) break;
        const int nx = next_member();
        if (nx < 0) break;
        issue_s(s, nx);
        issue_pv(&o[0][0], pa, cur);
        u32 pn[4][4];
        float al_a, al_b;
        wgmma_wait<1>();              // S of tile nx is done
        const bool moved = softmax(nx, klast, pn, al_a, al_b);  // while P V of tile cur runs
        wgmma_wait0();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) reg_fence4(pa[kk]);  // P of tile cur stays live until here
        release(cur);
        // the lazy max leaves alpha = 1 on most tiles: skip the 64 multiplies when the whole warp may
        if (LAZY ? moved : __any_sync(0xffffffff, al_a != 1.f || al_b != 1.f)) {
#pragma unroll
            for (int i = 0; i < D / 8; ++i) {
                o[i][0] *= al_a;
                o[i][1] *= al_a;
                o[i][2] *= al_b;
                o[i][3] *= al_b;
            }
            if (MMA_SUMS) {
                lsum[0] *= al_a;
                lsum[1] *= al_a;
                lsum[2] *= al_b;
                lsum[3] *= al_b;
            }
        }
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            pa[kk][0] = pn[kk][0];
            pa[kk][1] = pn[kk][1];
            pa[kk][2] = pn[kk][2];
            pa[kk][3] = pn[kk][3];
        }
        cur = nx;
    }
    if (cur >= 0) {
        issue_pv(&o[0][0], pa, cur);
        wgmma_wait0();
        release(cur);
    }
    // after its DONE tag: release that tile and the rest up to END
    if (!(ktag[ts] & END)) {
        mbar_arrive(empty + 8 * ts);
        for (;;) {
            advance();
            mbar_wait(full + 8 * ts, tph);
            if (ktag[ts] & END) break;
            mbar_arrive(empty + 8 * ts);
        }
    }

    if (MMA_SUMS) {
        // whole-row sums: a quarter in each thread of the quad, which store_rows adds up (exact: the
        // four quarters are equal and a division by 4 is exact)
        l_a = 0.25f * lsum[0];
        l_b = 0.25f * lsum[2];
    }
    store_rows<D>(o, l_a, l_b, out + (u64)hw * n * D, ra, rb, n, tq);
    }
}

// K and V as TMA tensor maps too (3-D: head_dim, n, kv_heads; 64 x 64 boxes, 128B swizzle, zero fill).
// Each in two variants: `name` runs dense attention and sparse attention over a tile schedule written
// before the launch (`sched`, ws_schedule2 / 3); `name_merge` sparse attention whose producer merges
// the lists itself.
#define WS_ARGS                                                                                           \
    ATTN_ARGS, const __grid_constant__ TmaDesc tmk, const __grid_constant__ TmaDesc tmv, int pair_heads,   \
        const u32 *__restrict__ ucol_idx, const u32 *__restrict__ ucol_len, int use_union,                 \
        const u32 *__restrict__ sched, int interleave
#define WS_KERNEL(name, threads, D, NC, MERGE)                                                             \
    extern "C" __global__ void __launch_bounds__(threads, 1) name(WS_ARGS) {                               \
        attn_fwd_ws<D, NC, MERGE>(q, k, v, out, blk_off, blk_idx, col_off, col_idx, n, q_heads, group,     \
                                  scale_log2, dense, tmk, tmv, pair_heads, ucol_idx, ucol_len, use_union,  \
                                  sched, interleave);                                                      \
    }
WS_KERNEL(attn_fwd_ws_d128, 384, 128, 2, false)
WS_KERNEL(attn_fwd_ws_d64, 384, 64, 2, false)
// Three consumer warpgroups (query blocks 3p..3p+2 of one head), 11 stages at head_dim 64 and 5 at 128,
// Q in its own tiles; no head pairing (the host passes pair_heads = 0); union column lists of three
// blocks.
WS_KERNEL(attn_fwd_ws3_d64, 512, 64, 3, false)
WS_KERNEL(attn_fwd_ws3_d128, 512, 128, 3, false)
WS_KERNEL(attn_fwd_ws_d128_merge, 384, 128, 2, true)
WS_KERNEL(attn_fwd_ws_d64_merge, 384, 64, 2, true)
WS_KERNEL(attn_fwd_ws3_d64_merge, 512, 64, 3, true)
WS_KERNEL(attn_fwd_ws3_d128_merge, 512, 128, 3, true)

// ---- Dense attention over 128-key tiles (attn_fwd_wsk_d128, attn_fwd_wsk3_d64: the host's kernels
// for dense runs unless ATTNPLAN_DENSE128=0) ----
// FlashAttention-3's tiles: NC consumer warpgroups (query blocks NC p .. NC p + NC - 1 of one head:
// two at head_dim 128, three at 64) and a producer thread, 128 keys per K/V tile, so that the per-tile
// work that does not grow with the tile (the row reductions' shuffles, the lazy-max test, barrier
// waits, the loop) is paid once per 128 keys; the 64-key tiles of attn_fwd_ws left the tensor pipe
// 65% busy on dense attention, their consumers held by that latency (docs/perf.md, "Fifteenth
// session"). S = Q K^T is m64n128k16 with Q from shared memory (the registers hold S of 128 keys, O
// and one set of P fragments, made from S once the P V reading the previous set is done, as
// FlashAttention-3 does); P V is m64n{D}k16 over 8 steps of 16 keys. Warpgroup w computes key tiles
// 0..T_w (the one holding its diagonal, masked; a 64-row block never straddles a 128-key boundary)
// and releases the group's later tiles unread. Same arithmetic per cell as attn_fwd_ws (online softmax
// in log2 units, lazy max, P rounded to bf16, f32 row sums; at head_dim 64 one exponential pair in
// exp2_emu<64>() on the FMA pipe).
// Shared memory: the NC Q tiles, NS stages of K and V of 128 keys (NS = 3 at head_dim 128, 6 at 64),
// 2 NS mbarriers and 1024 alignment bytes: 230,448 / 222,304 bytes.

// The online softmax of one 128-key S tile (rows ra, rb; keys k0 + 8 j + 2 tq (+1) in s[j]): as
// softmax_tile with f32 row sums, over 16 column groups, leaving P in s as f32 (pack128 makes the bf16
// fragments once the P V that reads the previous ones is done: one set of P registers, as
// FlashAttention-3 keeps); `mask` hides the keys past each row. EMU: as exp2_emu.
template <int EMU>
__device__ __forceinline__ bool softmax_tile128(float (*s)[4], bool mask, int k0, int ra, int rb, int tq,
                                                float scale_log2, float& m_a, float& m_b, float& l_a,
                                                float& l_b, float& al_a, float& al_b) {
    if (mask) {
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const int p0 = k0 + j * 8 + 2 * tq, p1 = p0 + 1;
            if (p0 > ra) s[j][0] = NEG_INF;
            if (p1 > ra) s[j][1] = NEG_INF;
            if (p0 > rb) s[j][2] = NEG_INF;
            if (p1 > rb) s[j][3] = NEG_INF;
        }
    }
    float ta[8], tb[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        ta[j] = fmaxf(fmaxf(s[j][0], s[j][1]), fmaxf(s[j + 8][0], s[j + 8][1]));
        tb[j] = fmaxf(fmaxf(s[j][2], s[j][3]), fmaxf(s[j + 8][2], s[j + 8][3]));
    }
#pragma unroll
    for (int w = 4; w >= 1; w >>= 1) {
#pragma unroll
        for (int j = 0; j < w; ++j) {
            ta[j] = fmaxf(ta[j], ta[j + w]);
            tb[j] = fmaxf(tb[j], tb[j + w]);
        }
    }
    float use_a, use_b;
    const bool moved = lazy_row_max<true>(ta[0], tb[0], scale_log2, m_a, m_b, use_a, use_b, al_a, al_b);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        const bool fma_pipe = EMU > 0 && j % (EMU > 0 ? EMU : 1) == (EMU > 0 ? EMU : 1) - 1;
        const float x0 = fmaf(s[j][0], scale_log2, -use_a), x1 = fmaf(s[j][1], scale_log2, -use_a);
        const float x2 = fmaf(s[j][2], scale_log2, -use_b), x3 = fmaf(s[j][3], scale_log2, -use_b);
        s[j][0] = fma_pipe ? exp2_fma(x0) : fast_exp2(x0);
        s[j][1] = fma_pipe ? exp2_fma(x1) : fast_exp2(x1);
        s[j][2] = fma_pipe ? exp2_fma(x2) : fast_exp2(x2);
        s[j][3] = fma_pipe ? exp2_fma(x3) : fast_exp2(x3);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        ta[j] = (s[j][0] + s[j][1]) + (s[j + 8][0] + s[j + 8][1]);
        tb[j] = (s[j][2] + s[j][3]) + (s[j + 8][2] + s[j + 8][3]);
    }
#pragma unroll
    for (int w = 4; w >= 1; w >>= 1) {
#pragma unroll
        for (int j = 0; j < w; ++j) {
            ta[j] += ta[j + w];
            tb[j] += tb[j + w];
        }
    }
    l_a = l_a * al_a + ta[0];
    l_b = l_b * al_b + tb[0];
    return moved;  // whether some alpha of the warp is not 1
}

// P of a 128-key tile (f32 in s) as the bf16 A fragments of its 8 P V steps.
__device__ __forceinline__ void pack128(const float (*s)[4], u32 (*p)[4]) {
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
        p[kk][0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
        p[kk][1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
        p[kk][2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        p[kk][3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
}

template <int D, int NC>
__device__ __forceinline__ void attn_fwd_wsk(const bf16_t* __restrict__ q, bf16_t* __restrict__ out, int n,
                                             int q_heads, int group, float scale_log2, const TmaDesc& tmk,
                                             const TmaDesc& tmv) {
    static_assert((D == 128 && NC == 2) || (D == 64 && NC == 3), "head_dim 128 with two consumers, 64 with three");
    constexpr int BM = 64, BN = 128, NS = D == 128 ? 3 : 6;
    constexpr u32 Q_BYTES = BM * D * 2, KV_BYTES = BN * D * 2;
    extern __shared__ __align__(1024) unsigned char smem[];
    const u32 base = (smem_u32(smem) + 1023u) & ~1023u;
    const u32 sQ = base;                  // warpgroup w's Q tile at sQ + w Q_BYTES (64 rows, D / 64 x 8 KB)
    const u32 sK = sQ + NC * Q_BYTES;     // stage s at sK + s KV_BYTES: D / 64 column blocks of 128 x 128 B
    const u32 sV = sK + NS * KV_BYTES;
    const u32 full = sV + NS * KV_BYTES;  // NS mbarriers (the producer's TMA bytes), then NS `empty`
    const u32 empty = full + 8 * NS;      // (every consumer thread)
    const int q_blocks = (n + BM - 1) / BM, q_groups = (q_blocks + NC - 1) / NC;
    const int id = blockIdx.x;
    const int pr = q_groups - 1 - id / q_heads;  // heaviest groups of all heads first
    const int h = id % q_heads, kvh = h / group;
    // key tiles 0..tiles - 1 reach the group's last row (or n - 1)
    const int tiles = min(BM * NC * (pr + 1), n) / BN + (min(BM * NC * (pr + 1), n) % BN != 0);
    const int tid = threadIdx.x, warp = __shfl_sync(0xffffffff, tid >> 5, 0), lane = tid & 31;
    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < NS; ++s) {
            mbar_init(full + 8 * s, 1);
            mbar_init(empty + 8 * s, 128 * NC);
        }
    }
    __syncthreads();

    if (warp >= 4 * NC) {
        // ---- producer: one thread issues the TMA loads (2 D / 64 boxes of 64 x 64 each of K and V per
        // tile; rows past n come back as zeros) ----
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;");
        if (tid == 128 * NC) {
            for (int t = 0; t < tiles; ++t) {
                const int s = t % NS, u = t / NS;
                if (u > 0) mbar_wait(empty + 8 * s, (u - 1) & 1);
                const u32 fb = full + 8 * s;
                mbar_arrive_expect_tx(fb, 2 * KV_BYTES);
                const u32 k_st = sK + s * KV_BYTES, v_st = sV + s * KV_BYTES;
#pragma unroll
                for (int c = 0; c < D / 64; ++c) {
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        const u32 off = c * (BN * 128) + hh * (64 * 128);
                        tma_load_3d(k_st + off, &tmk, 64 * c, t * BN + 64 * hh, kvh, fb);
                        tma_load_3d(v_st + off, &tmv, 64 * c, t * BN + 64 * hh, kvh, fb);
                    }
                }
            }
        }
        return;
    }

    // ---- consumers ----
    if constexpr (NC == 2) {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 240;");
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 160;");
    }
    const int wg = warp >> 2, wl = warp & 3;
    const int row0 = (NC * pr + wg) * BM;
    const int last = min((row0 + BM - 1) / BN, tiles - 1);  // this warpgroup's last tile (its diagonal)
    const int g = lane >> 2, tq = lane & 3;
    const int ra = row0 + wl * 16 + g, rb = ra + 8;
    const u32 sq = sQ + wg * Q_BYTES;
    // The Q tile, copied as attn_fwd_ws copies its own: one helper for both changed the register
    // assignment of attn_fwd_ws and cost its sparse launch 1.5% at 128K (docs/perf.md, sixteenth session).
    {
        const bf16_t* qh = q + (u64)h * n * D;
        const int ct = tid & 127, c = ct % (D / 8);
#pragma unroll
        for (int p = 0; p < BM * (D / 8) / 128; ++p) {
            const int r = ct / (D / 8) + p * (128 / (D / 8));
            const bool ok = row0 + r < n;
            cp_async16(sq + swz128(r, c), qh + (ok ? (u64)(row0 + r) * D + c * 8 : 0), ok ? 16 : 0);
        }
        cp_async_commit();
        cp_async_wait<0>();
        fence_proxy_async();  // the copies are read by wgmma (the async proxy)
        named_bar_sync(1 + wg, 128);
    }
    const u64 q_desc = gmma_desc(sq, 16, 1024);
    const u64 k_desc0 = gmma_desc(sK, 16, 1024), v_desc0 = gmma_desc(sV, BN * 128, 1024);
    auto issue_s = [&](float (*s)[4], int st) {
        const u64 kd = k_desc0 + (u64)((st * KV_BYTES) >> 4);
        wgmma_fence();
        wgmma_m64n128k16_ss<0, 0>(&s[0][0], q_desc, kd);  // the first step overwrites s
#pragma unroll
        for (int kk = 1; kk < D / 16; ++kk) {
            const u32 qo = (kk >> 2) * (BM * 128) + (kk & 3) * 32, ko = (kk >> 2) * (BN * 128) + (kk & 3) * 32;
            wgmma_m64n128k16_ss<0>(&s[0][0], q_desc + (u64)(qo >> 4), kd + (u64)(ko >> 4));
        }
        wgmma_commit();
    };
    auto issue_pv = [&](float* o, u32 (*p)[4], int st) {
        const u64 vd = v_desc0 + (u64)((st * KV_BYTES) >> 4);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            if constexpr (D == 128) wgmma_m64n128k16<1>(o, p[kk], vd + (u64)((kk * 2048) >> 4));
            else wgmma_m64n64k16<1>(o, p[kk], vd + (u64)((kk * 2048) >> 4));
        }
        wgmma_commit();
    };

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.f, l_b = 0.f;
    float s[16][4];
    u32 pa[8][4];
    int ts = 0, tph = 0;  // the current tile's stage and the parity of its phase
    mbar_wait(full, 0);
    issue_s(s, 0);
    wgmma_wait0();
    {
        float al_a, al_b;
        softmax_tile128<exp2_emu<D>()>(s, last == 0, 0, ra, rb, tq, scale_log2, m_a, m_b, l_a, l_b, al_a, al_b);
        pack128(s, pa);
    }
    // S of tile t and P V of tile t - 1 run while the softmax of t does (attn_fwd_ws's pipeline); P of
    // t replaces that of t - 1 once its P V is done
    for (int t = 1; t <= last; ++t) {
        int nts = ts + 1, nph = tph;
        if (nts == NS) {
            nts = 0;
            nph ^= 1;
        }
        mbar_wait(full + 8 * nts, nph);
        issue_s(s, nts);
        issue_pv(&o[0][0], pa, ts);
        float al_a, al_b;
        wgmma_wait<1>();  // S of tile t is done
        const bool moved = softmax_tile128<exp2_emu<D>()>(s, t == last, t * BN, ra, rb, tq, scale_log2, m_a, m_b,
                                                          l_a, l_b, al_a, al_b);
        wgmma_wait0();
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) reg_fence4(pa[kk]);  // P of tile t - 1 stays live until here
        mbar_arrive(empty + 8 * ts);
        pack128(s, pa);
        if (moved) {
#pragma unroll
            for (int i = 0; i < D / 8; ++i) {
                o[i][0] *= al_a;
                o[i][1] *= al_a;
                o[i][2] *= al_b;
                o[i][3] *= al_b;
            }
        }
        ts = nts;
        tph = nph;
    }
    issue_pv(&o[0][0], pa, ts);
    wgmma_wait0();
    mbar_arrive(empty + 8 * ts);
    // the group's later tiles, which other warpgroups compute: released unread, in order
    for (int t = last + 1; t < tiles; ++t) {
        if (++ts == NS) {
            ts = 0;
            tph ^= 1;
        }
        mbar_wait(full + 8 * ts, tph);
        mbar_arrive(empty + 8 * ts);
    }
    store_rows<D>(o, l_a, l_b, out + (u64)h * n * D, ra, rb, n, tq);
}

extern "C" __global__ void __launch_bounds__(384, 1) attn_fwd_wsk_d128(WS_ARGS) {
    attn_fwd_wsk<128, 2>(q, out, n, q_heads, group, scale_log2, tmk, tmv);
}
extern "C" __global__ void __launch_bounds__(512, 1) attn_fwd_wsk3_d64(WS_ARGS) {
    attn_fwd_wsk<64, 3>(q, out, n, q_heads, group, scale_log2, tmk, tmv);
}

// The schedules of the warp-specialized kernels (groups of two query blocks, 6 stages; of three, 11):
// one warp per group, 4 per CTA.
#define WS_SCHEDULE_ARGS                                                                                  \
    const u32 *__restrict__ blk_off, const u32 *__restrict__ blk_idx, const u32 *__restrict__ col_off,    \
        const u32 *__restrict__ ucol_len, int n, int q_heads, int use_union, u32 *__restrict__ sched
extern "C" __global__ void __launch_bounds__(128) ws_schedule2(WS_SCHEDULE_ARGS) {
    ws_schedule<2, 6>(blk_off, blk_idx, col_off, ucol_len, n, q_heads, use_union, sched);
}
extern "C" __global__ void __launch_bounds__(128) ws_schedule3(WS_SCHEDULE_ARGS) {
    ws_schedule<3, 11>(blk_off, blk_idx, col_off, ucol_len, n, q_heads, use_union, sched);
}
// attn_fwd_ws3_d128's: three consumers, 5 stages (its forcing rule differs with the stage count)
extern "C" __global__ void __launch_bounds__(128) ws_schedule3_ns5(WS_SCHEDULE_ARGS) {
    ws_schedule<3, 5>(blk_off, blk_idx, col_off, ucol_len, n, q_heads, use_union, sched);
}

#endif
