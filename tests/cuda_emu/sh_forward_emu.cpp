// cuda/kernels/sh_forward.cu compiled by g++ against the emulation headers.
#include "sh_forward.cu"
