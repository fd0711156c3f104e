// cuda/kernels/project_forward.cu compiled by g++ against the emulation headers.
#include "project_forward.cu"
