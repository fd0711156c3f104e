// The CUDA runtime as kernels see it under cuda_emu (tests only): see cuda_emu.h.
#pragma once
#include "cuda_emu.h"
