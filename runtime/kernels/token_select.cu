// Token-select index building on the GPU: the selection of `runtime::pattern::token_select` for every
// head of a layer, from the vertical scores of the vertical-slash estimate (`vs_est_*`: the attention
// the last queries pay to each token, `col[h][n]`).
//
// Per head h (parameters per head; block[h] == 0 marks a head without an index, whose lists stay empty):
// 1. ts_keep: the tokens kept in each chunk of block[h] tokens: keep[h] everywhere, or with a spread,
//    by the chunk's rank among the head's chunks by summed score (ties to the lower chunk), through the
//    host-computed table by_rank[rank_off[h] + rank] (`token_select::keeps_by_rank`).
// 2. ts_select: per (head, chunk): the chunk's top tokens by score, ties to the lower index -> sel[h][j].
// 3. ts_scan: per head: cum[h][0..=n] (exclusive prefix counts of sel) and list[h][..] (selected tokens,
//    ascending).
// 4. ts_count / vs_scan / ts_fill: per (head, query block): the A-shape blocks (sink blocks 0..S and the
//    local blocks L0..C, `a_shape::key_blocks`) and the selected tokens outside them (those in
//    [64 S, 64 L0)), as sorted lists.
//
// Scores are the f32 vertical scores (the CPU ranks f64 ones): selections can differ where two scores
// of a chunk, or two chunk sums, agree to f32 precision.

// Chunk sums (f64, in token order) and ranks: one CTA per head; chunk c gets keep_out[h][c].
extern "C" __global__ void __launch_bounds__(1024)
    ts_keep(const float* __restrict__ col, int n, const u32* __restrict__ block, const u32* __restrict__ keep,
            const u32* __restrict__ spread_on, const u32* __restrict__ rank_off, const u32* __restrict__ by_rank,
            double* __restrict__ sums, u32* __restrict__ keep_out) {
    const int h = blockIdx.x;
    const u32 b = block[h];
    if (b == 0) return;
    const int chunks = (n + (int)b - 1) / (int)b;
    const float* s = col + (u64)h * n;
    double* sm = sums + (u64)h * n;  // room for n chunks at most
    u32* ko = keep_out + (u64)h * n;
    if (!spread_on[h]) {
        for (int c = threadIdx.x; c < chunks; c += blockDim.x) ko[c] = min(keep[h], b);
        return;
    }
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        double t = 0.0;
        const int j1 = min(n, (c + 1) * (int)b);
        for (int j = c * (int)b; j < j1; ++j) t += (double)s[j];
        sm[c] = t;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        const double t = sm[c];
        u32 r = 0;
        for (int o = 0; o < chunks; ++o) r += sm[o] > t || (sm[o] == t && o < c);
        ko[c] = by_rank[rank_off[h] + r];
    }
}

// grid (chunks of the longest head, q_heads), 256 threads: the top keep_out[h][c] tokens of chunk c by
// score (rank = tokens with a higher score, or an equal one at a lower index) -> sel[h][j] = 0 / 1.
extern "C" __global__ void __launch_bounds__(256)
    ts_select(const float* __restrict__ col, int n, const u32* __restrict__ block, const u32* __restrict__ keep_out,
              u32* __restrict__ sel) {
    const int h = blockIdx.y, c = blockIdx.x;
    const u32 b = block[h];
    if (b == 0 || c * (u64)b >= (u64)n) return;
    const int j0 = c * (int)b, j1 = min(n, j0 + (int)b);
    const float* s = col + (u64)h * n;
    const u32 k = keep_out[(u64)h * n + c];
    for (int j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
        const float t = s[j];
        u32 r = 0;
        for (int o = j0; o < j1 && r < k; ++o) r += s[o] > t || (s[o] == t && o < j);
        sel[(u64)h * n + j] = r < k;
    }
}

// One CTA of 1024 threads per head: cum[h][0..=n] and the ascending list of selected tokens.
extern "C" __global__ void __launch_bounds__(1024)
    ts_scan(const u32* __restrict__ sel, int n, const u32* __restrict__ block, u32* __restrict__ cum,
            u32* __restrict__ list) {
    __shared__ u32 s_total;
    const int h = blockIdx.x;
    if (block[h] == 0) return;
    const u32* f = sel + (u64)h * n;
    u32* cu = cum + (u64)h * (n + 1);
    u32* li = list + (u64)h * n;
    // two coalesced passes over the warps' runs: counts, then prefix counts and the list
    const int lane = threadIdx.x & 31;
    const u32 lt = (1u << lane) - 1;
    int a, b;
    warp_run_1024(n, a, b);
    u32 cnt = 0;
    for (int base = a; base < b; base += 32) {
        const int j = base + lane;
        cnt += __popc(__ballot_sync(0xffffffffu, j < b && f[j] != 0));
    }
    u32 run = warps_before_1024(cnt, &s_total);
    for (int base = a; base < b; base += 32) {
        const int j = base + lane;
        const bool on = j < b && f[j] != 0;
        const u32 bal = __ballot_sync(0xffffffffu, on);
        const u32 before = run + __popc(bal & lt);
        if (j < b) cu[j] = before;
        if (on) li[before] = (u32)j;
        run += __popc(bal);
    }
    if (threadIdx.x == 0) cu[n] = s_total;
}

// The A-shape blocks of query block qb: sink blocks [0, s) and local blocks [l0, causal) (clamped as
// `a_shape::key_blocks`).
__device__ __forceinline__ void ts_blocks(int n, int qb, u32 sink, u32 local, int& s, int& l0, int& causal) {
    const int r0 = qb * 64, r1 = min(n, r0 + 64);
    causal = (r1 - 1) / 64 + 1;
    const u32 sk = min(sink, (u32)n), lc = max(1u, min(local, (u32)n));
    s = min((int)((sk + 63) / 64), causal);
    const int first_key = max(0, r0 + 1 - (int)lc);
    l0 = min(first_key / 64, causal);
}

// One thread per (head, query block): the list sizes.
extern "C" __global__ void ts_count(const u32* __restrict__ cum, int n, int q_heads, const u32* __restrict__ block,
                                    const u32* __restrict__ sink, const u32* __restrict__ local,
                                    u32* __restrict__ cnt_blk, u32* __restrict__ cnt_col) {
    const int q_blocks = (n + 63) / 64;
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= q_heads * q_blocks) return;
    const int h = e / q_blocks, qb = e % q_blocks;
    if (block[h] == 0) {
        cnt_blk[e] = 0;
        cnt_col[e] = 0;
        return;
    }
    int s, l0, causal;
    ts_blocks(n, qb, sink[h], local[h], s, l0, causal);
    const u32* cu = cum + (u64)h * (n + 1);
    if (l0 <= s) {
        cnt_blk[e] = causal;
        cnt_col[e] = 0;
    } else {
        cnt_blk[e] = s + (causal - l0);
        cnt_col[e] = cu[l0 * 64] - cu[s * 64];
    }
}

// One CTA of FILL_THREADS per (head, query block): blocks ascending, then the selected tokens in
// [64 s, 64 l0) (a copy of up to the head's whole list: a warp per entry, as before, waited on the
// last blocks' copies).
extern "C" __global__ void __launch_bounds__(FILL_THREADS)
    ts_fill(const u32* __restrict__ cum, const u32* __restrict__ list, int n, int q_heads,
            const u32* __restrict__ block, const u32* __restrict__ sink, const u32* __restrict__ local,
            const u32* __restrict__ blk_off, const u32* __restrict__ col_off, u32* __restrict__ blk_idx,
            u32* __restrict__ col_idx) {
    const int q_blocks = (n + 63) / 64;
    const int e = blockIdx.x, tid = threadIdx.x;
    if (e >= q_heads * q_blocks) return;
    const int h = e / q_blocks, qb = e % q_blocks;
    if (block[h] == 0) return;
    int s, l0, causal;
    ts_blocks(n, qb, sink[h], local[h], s, l0, causal);
    u32* bo = blk_idx + blk_off[e];
    if (l0 <= s) {
        for (int kb = tid; kb < causal; kb += FILL_THREADS) bo[kb] = kb;
        return;
    }
    for (int i = tid; i < s; i += FILL_THREADS) bo[i] = i;
    for (int i = tid; i < causal - l0; i += FILL_THREADS) bo[s + i] = l0 + i;
    const u32* cu = cum + (u64)h * (n + 1);
    const u32 a = cu[s * 64], b = cu[l0 * 64];
    const u32* li = list + (u64)h * n;
    strided_copy(col_idx + col_off[e], li + a, b - a, tid, FILL_THREADS);
}
