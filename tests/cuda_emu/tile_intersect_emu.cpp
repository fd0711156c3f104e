// cuda/kernels/tile_intersect.cu compiled by g++ against the emulation headers.
#include "tile_intersect.cu"
