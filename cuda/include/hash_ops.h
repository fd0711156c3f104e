// The hash-encoding functions every compiled extension exposes to Python, with the same
// arguments and outputs (recon/fields/hash_encoding.py runs either): the CPU extension
// (cpu/bindings.cpp) and the CUDA one (kernels/bindings.cpp) each define them and
// register them with this macro inside PYBIND11_MODULE.
//
//   hash_encode_forward(x [N,D], table [L,S,F], scales [L], res [L] int32) -> [N, L*F]
//   hash_encode_backward(x, table, scales, res, v_out [N, L*F], x_grad)
//       -> (v_table [L,S,F], v_x [N,D] or None)
#pragma once

#include <torch/extension.h>

// The shapes both extensions check (each checks devices and dtypes its own way).
inline void check_hash_shapes(const torch::Tensor& x, const torch::Tensor& table, const torch::Tensor& scales,
                              const torch::Tensor& res) {
  TORCH_CHECK(x.dim() == 2 && table.dim() == 3 && scales.dim() == 1 && res.dim() == 1, "hash encoding: x [N,D], "
              "table [L,S,F], scales [L], res [L]");
  const int64_t L = table.size(0), S = table.size(1);
  TORCH_CHECK(scales.size(0) == L && res.size(0) == L, "hash encoding: scales and res need one entry per level");
  TORCH_CHECK(S > 0 && (S & (S - 1)) == 0 && S <= (int64_t(1) << 31), "hash encoding: the table size ", S,
              " is not a power of two up to 2^31");
}

#define HASH_REGISTER_OPS(m)                          \
  m.def("hash_encode_forward", &hash_encode_forward); \
  m.def("hash_encode_backward", &hash_encode_backward)
