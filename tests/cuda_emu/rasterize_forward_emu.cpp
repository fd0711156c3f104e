// cuda/kernels/rasterize_forward.cu compiled by g++ against the emulation headers.
#include "rasterize_forward.cu"
