// How a kernel is launched: the one place where the CUDA build and the CPU emulation of
// the tests (tests/cuda_emu) differ.
#pragma once

#include <type_traits>

#include <cuda_runtime.h>

#ifdef __CUDACC__
#define SPLAT_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#else
#define SPLAT_LAUNCH(kernel, grid, block, stream, ...) ::cuda_emu::launch(kernel, grid, block, stream, __VA_ARGS__)
#endif

namespace splat_cuda {

// Calls launch(std::integral_constant<int, D>{}) for the channel counts the kernels are
// instantiated for (1 to 4: colour and depth); cudaErrorInvalidValue for others.
template <class Launch> cudaError_t with_channels(int D, Launch&& launch) {
  switch (D) {
    case 1: launch(std::integral_constant<int, 1>{}); break;
    case 2: launch(std::integral_constant<int, 2>{}); break;
    case 3: launch(std::integral_constant<int, 3>{}); break;
    case 4: launch(std::integral_constant<int, 4>{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace splat_cuda
