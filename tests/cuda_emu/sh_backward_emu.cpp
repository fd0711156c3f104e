// cuda/kernels/sh_backward.cu compiled by g++ against the emulation headers.
#include "sh_backward.cu"
