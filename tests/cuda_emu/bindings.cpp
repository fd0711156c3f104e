// The CUDA kernels run on CPU tensors through cuda_emu (tests only), with the signatures
// of the CPU extension's rasterize_forward / rasterize_backward (cuda/cpu/bindings.cpp),
// float32 only.
#include <torch/extension.h>

#include <stdexcept>
#include <string>

#include "rasterize.h"

namespace {

void check(const torch::Tensor& t, const char* name, torch::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype, name,
              " must be a contiguous CPU tensor of ", dtype);
}

void ok(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, ": the kernels are not built for these channels or tile size");
}

const float* opt(const c10::optional<torch::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> rasterize_forward(
    const torch::Tensor& means2d, const torch::Tensor& conics, const torch::Tensor& features,
    const torch::Tensor& opacities, const c10::optional<torch::Tensor>& backgrounds, int64_t width,
    int64_t height, int64_t tile_size, const torch::Tensor& tile_offsets, const torch::Tensor& flat_ids) {
  for (auto [t, n] : {std::pair{&means2d, "means2d"}, {&conics, "conics"}, {&features, "features"},
                      {&opacities, "opacities"}})
    check(*t, n, torch::kFloat32);
  if (backgrounds.has_value()) check(*backgrounds, "backgrounds", torch::kFloat32);
  check(tile_offsets, "tile_offsets", torch::kInt64);
  check(flat_ids, "flat_ids", torch::kInt64);
  const int64_t C = means2d.size(0), N = means2d.size(1), D = features.size(2);
  auto opts = means2d.options();
  auto render = torch::empty({C, height, width, D}, opts);
  auto alpha = torch::empty({C, height, width, 1}, opts);
  auto final_T = torch::empty({C, height, width}, opts);
  auto last_ids = torch::empty({C, height, width}, opts.dtype(torch::kInt32));
  ok(splat_cuda::rasterize_forward(C, N, int(D), means2d.data_ptr<float>(), conics.data_ptr<float>(),
                                   features.data_ptr<float>(), opacities.data_ptr<float>(), opt(backgrounds),
                                   int(width), int(height), int(tile_size), int(tile_offsets.size(2)),
                                   int(tile_offsets.size(1)), tile_offsets.data_ptr<int64_t>(),
                                   flat_ids.data_ptr<int64_t>(), flat_ids.numel(), render.data_ptr<float>(),
                                   alpha.data_ptr<float>(), final_T.data_ptr<float>(), last_ids.data_ptr<int32_t>(),
                                   nullptr),
     "rasterize_forward");
  return {render, alpha, final_T, last_ids};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>>
rasterize_backward(const torch::Tensor& means2d, const torch::Tensor& conics, const torch::Tensor& features,
                   const torch::Tensor& opacities, const c10::optional<torch::Tensor>& backgrounds, int64_t width,
                   int64_t height, int64_t tile_size, const torch::Tensor& tile_offsets, const torch::Tensor& flat_ids,
                   const torch::Tensor& final_T, const torch::Tensor& last_ids, const torch::Tensor& v_render,
                   const torch::Tensor& v_alpha) {
  for (auto [t, n] : {std::pair{&means2d, "means2d"}, {&conics, "conics"}, {&features, "features"},
                      {&opacities, "opacities"}, {&final_T, "final_T"}, {&v_render, "v_render"},
                      {&v_alpha, "v_alpha"}})
    check(*t, n, torch::kFloat32);
  check(last_ids, "last_ids", torch::kInt32);
  const int64_t C = means2d.size(0), N = means2d.size(1), D = features.size(2);
  auto v_means2d = torch::zeros_like(means2d), v_conics = torch::zeros_like(conics);
  auto v_features = torch::zeros_like(features), v_opacities = torch::zeros_like(opacities);
  c10::optional<torch::Tensor> v_backgrounds;
  if (backgrounds.has_value()) v_backgrounds = torch::zeros_like(*backgrounds);
  ok(splat_cuda::rasterize_backward(
         C, N, int(D), means2d.data_ptr<float>(), conics.data_ptr<float>(), features.data_ptr<float>(),
         opacities.data_ptr<float>(), opt(backgrounds), int(width), int(height), int(tile_size),
         int(tile_offsets.size(2)), int(tile_offsets.size(1)), tile_offsets.data_ptr<int64_t>(),
         flat_ids.data_ptr<int64_t>(), flat_ids.numel(), final_T.data_ptr<float>(), last_ids.data_ptr<int32_t>(),
         v_render.data_ptr<float>(), v_alpha.data_ptr<float>(), v_means2d.data_ptr<float>(),
         v_conics.data_ptr<float>(), v_features.data_ptr<float>(), v_opacities.data_ptr<float>(),
         v_backgrounds.has_value() ? v_backgrounds->data_ptr<float>() : nullptr, nullptr),
     "rasterize_backward");
  return {v_means2d, v_conics, v_features, v_opacities, v_backgrounds};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "avatar-studio CUDA rasterization kernels run on the CPU by cuda_emu (tests only)";
  m.def("rasterize_forward", &rasterize_forward);
  m.def("rasterize_backward", &rasterize_backward);
}
