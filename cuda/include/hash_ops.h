// The hash-encoding functions every compiled extension exposes to Python, with the same
// arguments and outputs (recon/fields/hash_encoding.py runs either): the CPU extension
// (cpu/bindings.cpp) and the CUDA one (kernels/bindings.cpp) each define them and
// register them with this macro inside PYBIND11_MODULE.
//
//   hash_encode_forward(x [N,D], table [L,S,F], scales [L], res [L] int32) -> [N, L*F]
//   hash_encode_backward(x, table, scales, res, v_out [N, L*F], x_grad)
//       -> (v_table [L,S,F], v_x [N,D] or None)
#pragma once

#define HASH_REGISTER_OPS(m)                          \
  m.def("hash_encode_forward", &hash_encode_forward); \
  m.def("hash_encode_backward", &hash_encode_backward)
