// Hash encoding, backward (hash_math.h's encode_level_vjp, as on the CPU):
// - the table's gradient: one thread per (point, level), added atomically (points of one
//   level share hashed rows);
// - the positions' gradient, when asked for: one thread per point, its levels summed in
//   order (no atomics, the CPU's order).
#include <cstdint>

#include <cuda_runtime.h>

#include "hash_encoding.h"
#include "hash_math.h"
#include "launch.cuh"

namespace splat_cuda {

namespace {

constexpr int kThreads = 256;

template <int D, int F>
__global__ void __launch_bounds__(kThreads)
    hash_table_backward_kernel(int64_t N, int64_t L, int64_t S, const float* __restrict__ x,
                               const float* __restrict__ table, const float* __restrict__ scales,
                               const int32_t* __restrict__ res, const float* __restrict__ v_out,
                               float* __restrict__ v_table) {
  const int64_t n = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t l = blockIdx.y;
  if (n >= N) return;
  hashgrid::encode_level_vjp<D, F>(x + n * D, scales[l], uint32_t(res[l]), uint32_t(S), table + l * S * F,
                                   v_out + n * L * F + l * F, v_table + l * S * F, static_cast<float*>(nullptr),
                                   [](float* at, float v) { atomicAdd(at, v); });
}

template <int D, int F>
__global__ void __launch_bounds__(kThreads)
    hash_position_backward_kernel(int64_t N, int64_t L, int64_t S, const float* __restrict__ x,
                                  const float* __restrict__ table, const float* __restrict__ scales,
                                  const int32_t* __restrict__ res, const float* __restrict__ v_out,
                                  float* __restrict__ v_x) {
  const int64_t n = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= N) return;
  float vx[D];
  for (int d = 0; d < D; ++d) vx[d] = 0.f;
  for (int64_t l = 0; l < L; ++l)
    hashgrid::encode_level_vjp<D, F>(x + n * D, scales[l], uint32_t(res[l]), uint32_t(S), table + l * S * F,
                                     v_out + n * L * F + l * F, static_cast<float*>(nullptr), vx,
                                     [](float*, float) {});
  for (int d = 0; d < D; ++d) v_x[n * D + d] = vx[d];
}

}  // namespace

cudaError_t hash_encode_backward(int64_t N, int D, int64_t L, int64_t S, int F, const float* x, const float* table,
                                 const float* scales, const int32_t* res, const float* v_out, float* v_table,
                                 float* v_x, cudaStream_t stream) {
  if (N == 0 || L == 0) return hashgrid::with_shape(D, F, [](auto, auto) {}) ? cudaSuccess : cudaErrorInvalidValue;
  const unsigned blocks = unsigned((N + kThreads - 1) / kThreads);
  const bool built = hashgrid::with_shape(D, F, [&](auto dims, auto feats) {
    constexpr int kD = decltype(dims)::value, kF = decltype(feats)::value;
    auto* table_kernel = &hash_table_backward_kernel<kD, kF>;
    SPLAT_LAUNCH(table_kernel, dim3(blocks, unsigned(L)), dim3(kThreads), stream, N, L, S, x, table, scales, res, v_out,
                 v_table);
    if (v_x != nullptr) {
      auto* position_kernel = &hash_position_backward_kernel<kD, kF>;
      SPLAT_LAUNCH(position_kernel, dim3(blocks), dim3(kThreads), stream, N, L, S, x, table, scales, res, v_out, v_x);
    }
  });
  return built ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace splat_cuda
