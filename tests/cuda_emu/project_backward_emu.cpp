// cuda/kernels/project_backward.cu compiled by g++ against the emulation headers.
#include "project_backward.cu"
