// cuda/kernels/hash_encode_backward.cu compiled by g++ against the emulation headers.
#include "hash_encode_backward.cu"
