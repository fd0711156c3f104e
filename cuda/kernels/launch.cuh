// How a kernel is launched: the one place where the CUDA build and the CPU emulation of
// the tests (tests/cuda_emu) differ.
#pragma once

#include <cuda_runtime.h>

#ifdef __CUDACC__
#define SPLAT_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#else
#define SPLAT_LAUNCH(kernel, grid, block, stream, ...) ::cuda_emu::launch(kernel, grid, block, stream, __VA_ARGS__)
#endif
