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
        if (need_mask) {
            const int* kp = kpos + st * BN;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int p0 = kp[j * 8 + 2 * tq], p1 = kp[j * 8 + 2 * tq + 1];
                if (p0 > ra) s[j][0] = NEG_INF;
                if (p1 > ra) s[j][1] = NEG_INF;
                if (p0 > rb) s[j][2] = NEG_INF;
                if (p1 > rb) s[j][3] = NEG_INF;
            }
        }

        // Online softmax in log2 units.
        float mx_a = NEG_INF, mx_b = NEG_INF;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            mx_a = fmaxf(mx_a, fmaxf(s[j][0], s[j][1]));
            mx_b = fmaxf(mx_b, fmaxf(s[j][2], s[j][3]));
        }
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffff, mx_a, 1));
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffff, mx_a, 2));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffff, mx_b, 1));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffff, mx_b, 2));
        const float mn_a = fmaxf(m_a, mx_a * scale_log2), mn_b = fmaxf(m_b, mx_b * scale_log2);
        const float use_a = mn_a == NEG_INF ? 0.f : mn_a, use_b = mn_b == NEG_INF ? 0.f : mn_b;
        const float al_a = fast_exp2(m_a - use_a), al_b = fast_exp2(m_b - use_b);
        m_a = mn_a;
        m_b = mn_b;
        float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            s[j][0] = fast_exp2(fmaf(s[j][0], scale_log2, -use_a));
            s[j][1] = fast_exp2(fmaf(s[j][1], scale_log2, -use_a));
            s[j][2] = fast_exp2(fmaf(s[j][2], scale_log2, -use_b));
            s[j][3] = fast_exp2(fmaf(s[j][3], scale_log2, -use_b));
            sum_a += s[j][0] + s[j][1];
            sum_b += s[j][2] + s[j][3];
        }
        l_a = l_a * al_a + sum_a;
        l_b = l_b * al_b + sum_b;
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
            u32 a[4];
            a[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int nd = 0; nd < D / 8; nd += 2) {
                const int r = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
                const int c = nd + (lane >> 4);
                u32 b0, b1, b2, b3;
                ldsm_x4_t(b0, b1, b2, b3, v_st + swz<D>(r, c));
                mma_bf16(o[nd], a, b0, b1);
                mma_bf16(o[nd + 1], a, b2, b3);
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();

    l_a += __shfl_xor_sync(0xffffffff, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffff, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffff, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffff, l_b, 2);
    const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f, inv_b = l_b > 0.f ? 1.f / l_b : 0.f;
    bf16_t* oh = out + (u64)h * n * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
        const int c = i * 8 + 2 * tq;
        if (ra < n) *(u32*)(oh + (u64)ra * D + c) = pack_bf16(o[i][0] * inv_a, o[i][1] * inv_a);
        if (rb < n) *(u32*)(oh + (u64)rb * D + c) = pack_bf16(o[i][2] * inv_b, o[i][3] * inv_b);
    }
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
        if (need_mask) {
            const int* kp = kpos + st * BN;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int p0 = kp[j * 8 + 2 * tq], p1 = kp[j * 8 + 2 * tq + 1];
                if (p0 > ra) s[j][0] = NEG_INF;
                if (p1 > ra) s[j][1] = NEG_INF;
                if (p0 > rb) s[j][2] = NEG_INF;
                if (p1 > rb) s[j][3] = NEG_INF;
            }
        }

        float mx_a = NEG_INF, mx_b = NEG_INF;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            mx_a = fmaxf(mx_a, fmaxf(s[j][0], s[j][1]));
            mx_b = fmaxf(mx_b, fmaxf(s[j][2], s[j][3]));
        }
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffff, mx_a, 1));
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffff, mx_a, 2));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffff, mx_b, 1));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffff, mx_b, 2));
        const float mn_a = fmaxf(m_a, mx_a * scale_log2), mn_b = fmaxf(m_b, mx_b * scale_log2);
        const float use_a = mn_a == NEG_INF ? 0.f : mn_a, use_b = mn_b == NEG_INF ? 0.f : mn_b;
        const float al_a = fast_exp2(m_a - use_a), al_b = fast_exp2(m_b - use_b);
        m_a = mn_a;
        m_b = mn_b;
        float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            s[j][0] = fast_exp2(fmaf(s[j][0], scale_log2, -use_a));
            s[j][1] = fast_exp2(fmaf(s[j][1], scale_log2, -use_a));
            s[j][2] = fast_exp2(fmaf(s[j][2], scale_log2, -use_b));
            s[j][3] = fast_exp2(fmaf(s[j][3], scale_log2, -use_b));
            sum_a += s[j][0] + s[j][1];
            sum_b += s[j][2] + s[j][3];
        }
        l_a = l_a * al_a + sum_a;
        l_b = l_b * al_b + sum_b;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            o[i][0] *= al_a;
            o[i][1] *= al_a;
            o[i][2] *= al_b;
            o[i][3] *= al_b;
        }

        u32 pa[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            pa[kk][0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            pa[kk][1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            pa[kk][2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[kk][3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
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

    l_a += __shfl_xor_sync(0xffffffff, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffff, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffff, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffff, l_b, 2);
    const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f, inv_b = l_b > 0.f ? 1.f / l_b : 0.f;
    bf16_t* oh = out + (u64)h * n * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
        const int c = i * 8 + 2 * tq;
        if (ra < n) *(u32*)(oh + (u64)ra * D + c) = pack_bf16(o[i][0] * inv_a, o[i][1] * inv_a);
        if (rb < n) *(u32*)(oh + (u64)rb * D + c) = pack_bf16(o[i][2] * inv_b, o[i][3] * inv_b);
    }
}

extern "C" __global__ void __launch_bounds__(128, 2) attn_fwd_wg_d128(ATTN_ARGS) {
    attn_fwd_wg<128>(q, k, v, out, blk_off, blk_idx, col_off, col_idx, n, q_heads, group, scale_log2, dense);
}

extern "C" __global__ void __launch_bounds__(128, 3) attn_fwd_wg_d64(ATTN_ARGS) {
    attn_fwd_wg<64>(q, k, v, out, blk_off, blk_idx, col_off, col_idx, n, q_heads, group, scale_log2, dense);
}
// Dynamic shared memory of attn_fwd_wg<D>: as attn_fwd<D> plus 1024 bytes for the base alignment.

// Pipelined variant (head_dim 128): three K/V stages; the S = Q K^T wgmma of tile t+1 is issued before
// the softmax of tile t, so the tensor cores work while the softmax runs (FA3's intra-warpgroup
// overlap). Q passes through the third V stage before the pipeline starts, so shared memory is
// 6 tiles + 3 x 64 positions + 1024 alignment bytes = 100,096 bytes (2 CTAs per SM).
template <int D>
__device__ __forceinline__ void attn_fwd_wg2(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
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

    auto load_tile = [&](int t) {
        const int stage = t % NS;
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
    auto issue_s = [&](float (*s)[4], int t) {
        const u32 k_st = sK + (t % NS) * TILE_BYTES;
#pragma unroll
        for (int j = 0; j < 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const u64 desc = gmma_desc(k_st + (kk >> 2) * (64 * 128) + (kk & 3) * 32, 16, 1024);
            wgmma_m64n64k16<0>(&s[0][0], qf[kk], desc);
        }
        wgmma_commit();
    };

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.f, l_b = 0.f;
    float s_cur[8][4], s_nxt[8][4];

    if (ntiles > 0) load_tile(0);
    cp_async_commit();
    if (ntiles > 1) load_tile(1);
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();
    if (ntiles > 0) {
        issue_s(s_cur, 0);
        wgmma_wait0();
    }

    for (int t = 0; t < ntiles; ++t) {
        const int st = t % NS;
        if (t + 2 < ntiles) load_tile(t + 2);
        cp_async_commit();
        const bool more = t + 1 < ntiles;
        if (more) {
            cp_async_wait<1>();  // tile t+1 is in
            fence_proxy_async();
            __syncthreads();
            issue_s(s_nxt, t + 1);  // runs while the softmax of tile t does
        }

        bool need_mask;
        if (t < nb) {
            const int kb = dense ? t : (int)blk_idx[bstart + t];
            need_mask = kb * BN + BN - 1 > row0 || kb * BN + BN > n;
        } else {
            need_mask = true;
        }
        if (need_mask) {
            const int* kp = kpos + st * BN;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int p0 = kp[j * 8 + 2 * tq], p1 = kp[j * 8 + 2 * tq + 1];
                if (p0 > ra) s_cur[j][0] = NEG_INF;
                if (p1 > ra) s_cur[j][1] = NEG_INF;
                if (p0 > rb) s_cur[j][2] = NEG_INF;
                if (p1 > rb) s_cur[j][3] = NEG_INF;
            }
        }
        float mx_a = NEG_INF, mx_b = NEG_INF;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            mx_a = fmaxf(mx_a, fmaxf(s_cur[j][0], s_cur[j][1]));
            mx_b = fmaxf(mx_b, fmaxf(s_cur[j][2], s_cur[j][3]));
        }
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffff, mx_a, 1));
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffff, mx_a, 2));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffff, mx_b, 1));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffff, mx_b, 2));
        const float mn_a = fmaxf(m_a, mx_a * scale_log2), mn_b = fmaxf(m_b, mx_b * scale_log2);
        const float use_a = mn_a == NEG_INF ? 0.f : mn_a, use_b = mn_b == NEG_INF ? 0.f : mn_b;
        const float al_a = fast_exp2(m_a - use_a), al_b = fast_exp2(m_b - use_b);
        m_a = mn_a;
        m_b = mn_b;
        float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            s_cur[j][0] = fast_exp2(fmaf(s_cur[j][0], scale_log2, -use_a));
            s_cur[j][1] = fast_exp2(fmaf(s_cur[j][1], scale_log2, -use_a));
            s_cur[j][2] = fast_exp2(fmaf(s_cur[j][2], scale_log2, -use_b));
            s_cur[j][3] = fast_exp2(fmaf(s_cur[j][3], scale_log2, -use_b));
            sum_a += s_cur[j][0] + s_cur[j][1];
            sum_b += s_cur[j][2] + s_cur[j][3];
        }
        l_a = l_a * al_a + sum_a;
        l_b = l_b * al_b + sum_b;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            o[i][0] *= al_a;
            o[i][1] *= al_a;
            o[i][2] *= al_b;
            o[i][3] *= al_b;
        }
        u32 pa[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            pa[kk][0] = pack_bf16(s_cur[2 * kk][0], s_cur[2 * kk][1]);
            pa[kk][1] = pack_bf16(s_cur[2 * kk][2], s_cur[2 * kk][3]);
            pa[kk][2] = pack_bf16(s_cur[2 * kk + 1][0], s_cur[2 * kk + 1][1]);
            pa[kk][3] = pack_bf16(s_cur[2 * kk + 1][2], s_cur[2 * kk + 1][3]);
        }
        const u32 v_st = sV + st * TILE_BYTES;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const u64 desc = gmma_desc(v_st + kk * 2048, 64 * 128, 1024);
            wgmma_m64n128k16<1>(&o[0][0], pa[kk], desc);
        }
        wgmma_commit();
        wgmma_wait0();
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            s_cur[j][0] = s_nxt[j][0];
            s_cur[j][1] = s_nxt[j][1];
            s_cur[j][2] = s_nxt[j][2];
            s_cur[j][3] = s_nxt[j][3];
        }
        __syncthreads();  // stage st is free for the load of tile t + 3
    }
    cp_async_wait<0>();

    l_a += __shfl_xor_sync(0xffffffff, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffff, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffff, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffff, l_b, 2);
    const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f, inv_b = l_b > 0.f ? 1.f / l_b : 0.f;
    bf16_t* oh = out + (u64)h * n * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
        const int c = i * 8 + 2 * tq;
        if (ra < n) *(u32*)(oh + (u64)ra * D + c) = pack_bf16(o[i][0] * inv_a, o[i][1] * inv_a);
        if (rb < n) *(u32*)(oh + (u64)rb * D + c) = pack_bf16(o[i][2] * inv_b, o[i][3] * inv_b);
    }
}

extern "C" __global__ void __launch_bounds__(128, 2) attn_fwd_wg2_d128(ATTN_ARGS) {
    attn_fwd_wg2<128>(q, k, v, out, blk_off, blk_idx, col_off, col_idx, n, q_heads, group, scale_log2, dense);
}
#endif
