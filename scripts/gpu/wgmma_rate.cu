// Tensor-core rate of the wgmma shapes attention.cu's warp-specialized kernels issue, with no loads
// and no softmax: what the consumers' MMAs alone can reach on this GPU. One CTA per SM, W consumer
// warpgroups per CTA, each looping over the same shared tiles (filled with small bf16 values once).
//
// Modes (one "tile" = what a consumer warpgroup issues per 64 or 128 keys of head_dim 128):
//   s64     S = Q K^T of a 64-key tile: 8 x wgmma m64n64k16 (A from registers), then wait
//   pv128   O += P V of a 64-key tile: 4 x m64n128k16 (A from registers, B MN-major), then wait
//   pipe64  the kernels' loop without the softmax: S of tile t+1 and P V of tile t in flight, wait<1>,
//           wait<0> (attn_fwd_ws_d128's MMAs per 64-key tile)
//   pipe128 the same with 128-key tiles: S 8 x m64n128k16, P V 8 x m64n128k16 (FlashAttention-3's
//           tile at head_dim 128)
//
// Build and run on the GPU machine:
//   nvcc -O3 -gencode arch=compute_90a,code=sm_90a -std=c++17 -o /tmp/wgmma_rate scripts/gpu/wgmma_rate.cu && /tmp/wgmma_rate
// Prints, per mode and warpgroup count (one to three; two for pipe128), the milliseconds and TFLOP/s (dense FLOPs, 2 per multiply-add).
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

// wgmma.cuh defines its helpers under __CUDA_ARCH_FEAT_SM90_ALL (NVRTC sets it for compute_90a); define
// it here for every pass, so that nvcc's host pass sees them too (their inline PTX is only assembled
// for the device, which must be sm_90a).
#ifndef __CUDA_ARCH_FEAT_SM90_ALL
#define __CUDA_ARCH_FEAT_SM90_ALL 1
#endif
#include "../../runtime/kernels/common.cuh"
#include "../../runtime/kernels/wgmma.cuh"

#define CK(x)                                                                               \
    do {                                                                                    \
        cudaError_t e = (x);                                                                \
        if (e != cudaSuccess) {                                                             \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
            exit(1);                                                                        \
        }                                                                                   \
    } while (0)

constexpr int SMEM = 64 * 1024 + 1024;  // a 32 KB K tile and a 32 KB V tile (128 keys x 128 dims)

template <int MODE, int THREADS>
__global__ void __launch_bounds__(THREADS, 1) rate(int iters, float* sink) {
    extern __shared__ __align__(1024) unsigned char smem[];
    const u32 base = (smem_u32(smem) + 1023u) & ~1023u;
    for (int i = threadIdx.x; i < 64 * 1024 / 4; i += blockDim.x) {
        // bf16 values in [0.5, 1): 0x3f00 + low mantissa bits
        const u32 a = 0x3f00u | (i * 37u & 0x7fu), b = 0x3f00u | (i * 91u & 0x7fu);
        asm volatile("st.shared.u32 [%0], %1;" ::"r"(base + 4 * i), "r"(a | (b << 16)) : "memory");
    }
    fence_proxy_async();
    __syncthreads();
    const u32 sK = base, sV = base + 32 * 1024;
    const u64 k_desc = gmma_desc(sK, 16, 1024), v_desc = gmma_desc(sV, 64 * 128, 1024);
    // four A fragments, reused (their values do not matter; fewer registers, so that the 128-key mode
    // keeps its S and O accumulators without serializing the wgmmas)
    u32 a[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int j = 0; j < 4; ++j) a[kk][j] = 0x3f003f00u | ((threadIdx.x * 7 + kk * 3 + j) & 0x7f);
    float s[64], o[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) s[i] = o[i] = 0.f;
    for (int it = 0; it < iters; ++it) {
        if (MODE == 0 || MODE == 2 || MODE == 3) {
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < 8; ++kk) {
                const u64 d = k_desc + (u64)(((kk >> 2) * (64 * 128) + (kk & 3) * 32) >> 4);
                if (MODE == 3) wgmma_m64n128k16<0>(s, a[kk & 3], d);
                else wgmma_m64n64k16<0>(s, a[kk & 3], d);
            }
            wgmma_commit();
        }
        if (MODE == 1 || MODE == 2 || MODE == 3) {
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < (MODE == 3 ? 8 : 4); ++kk) wgmma_m64n128k16<1>(o, a[kk & 3], v_desc + (u64)((kk * 2048) >> 4));
            wgmma_commit();
        }
        if (MODE >= 2) wgmma_wait<1>();
        wgmma_wait0();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) reg_fence4(a[kk]);
    }
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < 64; ++i) acc += s[i] + o[i];
    if (acc == 12345.f) sink[threadIdx.x] = acc;  // keeps the MMAs
}

template <int MODE, int W>
void run_w(const char* name, double flops_per_iter, int sms, float* sink) {
    auto k = rate<MODE, 128 * W>;
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM));
    const int iters = 20000;
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    k<<<sms, 128 * W, SMEM>>>(100, sink);  // warm-up
    CK(cudaGetLastError());
    float best = 1e30f;
    for (int rep = 0; rep < 5; ++rep) {
        CK(cudaEventRecord(e0));
        k<<<sms, 128 * W, SMEM>>>(iters, sink);
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        best = ms < best ? ms : best;
    }
    const double tf = flops_per_iter * iters * W * sms / (best * 1e-3) / 1e12;
    printf("%-8s %d warpgroup(s): %8.3f ms  %6.1f TFLOP/s\n", name, W, best, tf);
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
}

template <int MODE>
void run(const char* name, double flops_per_iter, int sms) {
    float* sink;
    CK(cudaMalloc(&sink, 4096));
    run_w<MODE, 1>(name, flops_per_iter, sms, sink);
    run_w<MODE, 2>(name, flops_per_iter, sms, sink);
    // three warpgroups of 128-key tiles do not fit 168 registers per thread (ptxas serializes them)
    if constexpr (MODE != 3) run_w<MODE, 3>(name, flops_per_iter, sms, sink);
    CK(cudaFree(sink));
}

int main() {
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const double mnk = 2.0 * 64 * 16;  // FLOPs per m64nXk16 per unit of X
    run<0>("s64", 8 * mnk * 64, sms);
    run<1>("pv128", 4 * mnk * 128, sms);
    run<2>("pipe64", 8 * mnk * 64 + 4 * mnk * 128, sms);
    run<3>("pipe128", 8 * mnk * 128 + 8 * mnk * 128, sms);
    return 0;
}
