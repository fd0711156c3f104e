// The functions every compiled rasterizer extension exposes to Python, with the same
// arguments and outputs, so that recon/raster/kernels_backend.py runs either: the CPU
// extension (cpu/bindings.cpp) and the CUDA one (kernels/bindings.cpp) each define them
// and register them with this macro inside PYBIND11_MODULE.
#pragma once

#define SPLAT_REGISTER_RASTER_OPS(m)                  \
  m.def("project_forward", &project_forward);         \
  m.def("project_backward", &project_backward);       \
  m.def("sh_forward", &sh_forward);                   \
  m.def("sh_backward", &sh_backward);                 \
  m.def("isect_tiles", &isect_tiles);                 \
  m.def("rasterize_forward", &rasterize_forward);     \
  m.def("rasterize_backward", &rasterize_backward)
