// cuda/kernels/rasterize_backward.cu compiled by g++ against the emulation headers.
#include "rasterize_backward.cu"
