// The one Python module, decomp._C. Tensors arrive as TensorView (pointer, shape, strides, dtype, device)
// built by python/decomp/ops.py, which also validates them and allocates every output.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "common/cpu_util.h"
#include "fisher/fisher.h"
#include "sketch/sketch.h"

namespace py = pybind11;
using decomp::TensorView;

namespace {

decomp::FisherInputs fisher_inputs(const std::optional<TensorView>& lengths, const std::optional<TensorView>& weights,
                                   int num_threads, uintptr_t stream) {
  decomp::FisherInputs in;
  in.lengths = lengths ? &*lengths : nullptr;
  in.weights = weights ? &*weights : nullptr;
  in.num_threads = num_threads;
  in.stream = stream;
  return in;
}

py::dict build_info() {
  py::dict info;
  info["version"] = DECOMP_VERSION;
#ifdef DECOMP_WITH_CUDA
  info["cuda_compiled"] = true;
  info["cuda_archs"] = std::string(DECOMP_CUDA_ARCHS);
#else
  info["cuda_compiled"] = false;
  info["cuda_archs"] = std::string();
#endif
  info["openmp_threads"] = omp_get_max_threads();
  info["simd_width"] = decomp::kVecWidth;
  return info;
}

decomp::SketchParams sketch_params(uint32_t seed, uint32_t stream, decomp::Distribution dist, uint64_t offset,
                                   float scale, int num_threads, uintptr_t cuda_stream) {
  decomp::SketchParams params;
  params.seed = seed;
  params.stream = stream;
  params.dist = dist;
  params.offset = offset;
  params.scale = scale;
  params.num_threads = num_threads;
  params.cuda_stream = cuda_stream;
  return params;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "decomp native core: Fisher and sketch kernels over raw tensor views";

  py::enum_<decomp::DType>(m, "DType")
      .value("float32", decomp::DType::Float32)
      .value("bfloat16", decomp::DType::BFloat16)
      .value("int64", decomp::DType::Int64)
      .value("int32", decomp::DType::Int32)
      .value("float64", decomp::DType::Float64);

  py::enum_<decomp::Distribution>(m, "Distribution")
      .value("rademacher", decomp::Distribution::Rademacher)
      .value("gaussian", decomp::Distribution::Gaussian);

  py::class_<TensorView>(m, "TensorView")
      .def(py::init([](uintptr_t ptr, std::vector<int64_t> shape, std::vector<int64_t> strides, decomp::DType dtype,
                       bool is_cuda, int device_index) {
             decomp::require(shape.size() == strides.size(), "TensorView: shape and strides differ in length");
             TensorView v;
             v.ptr = ptr;
             v.shape = std::move(shape);
             v.strides = std::move(strides);
             v.dtype = dtype;
             v.device = is_cuda ? decomp::DeviceType::CUDA : decomp::DeviceType::CPU;
             v.device_index = device_index;
             return v;
           }),
           py::arg("ptr"), py::arg("shape"), py::arg("strides"), py::arg("dtype"), py::arg("is_cuda"),
           py::arg("device_index"))
      .def_readonly("shape", &TensorView::shape)
      .def_readonly("strides", &TensorView::strides);

  m.def("build_info", &build_info);

  // Kernels release the GIL: they touch no Python object.
  m.def(
      "fisher_linear",
      [](const TensorView& A, const TensorView& G, const std::optional<TensorView>& lengths,
         const std::optional<TensorView>& weights, const TensorView& out, int num_threads, uintptr_t stream) {
        py::gil_scoped_release release;
        decomp::fisher_linear(A, G, out, fisher_inputs(lengths, weights, num_threads, stream));
      },
      py::arg("A"), py::arg("G"), py::arg("lengths"), py::arg("weights"), py::arg("out"), py::arg("num_threads"),
      py::arg("stream"));
  m.def(
      "fisher_linear_bias",
      [](const TensorView& G, const std::optional<TensorView>& lengths, const std::optional<TensorView>& weights,
         const TensorView& out, int num_threads, uintptr_t stream) {
        py::gil_scoped_release release;
        decomp::fisher_linear_bias(G, out, fisher_inputs(lengths, weights, num_threads, stream));
      },
      py::arg("G"), py::arg("lengths"), py::arg("weights"), py::arg("out"), py::arg("num_threads"),
      py::arg("stream"));
  m.def(
      "fisher_embedding",
      [](const TensorView& ids, const TensorView& G, const std::optional<TensorView>& lengths,
         const std::optional<TensorView>& weights, const TensorView& out, int num_threads, uintptr_t stream) {
        py::gil_scoped_release release;
        decomp::fisher_embedding(ids, G, out, fisher_inputs(lengths, weights, num_threads, stream));
      },
      py::arg("ids"), py::arg("G"), py::arg("lengths"), py::arg("weights"), py::arg("out"), py::arg("num_threads"),
      py::arg("stream"));

  m.def(
      "projection_matrix",
      [](const TensorView& out, uint32_t seed, uint32_t stream, decomp::Distribution dist, uint64_t offset,
         float scale, int num_threads, uintptr_t cuda_stream) {
        py::gil_scoped_release release;
        decomp::projection_matrix(out, sketch_params(seed, stream, dist, offset, scale, num_threads, cuda_stream));
      },
      py::arg("out"), py::arg("seed"), py::arg("stream"), py::arg("dist"), py::arg("offset"), py::arg("scale"),
      py::arg("num_threads"), py::arg("cuda_stream"));
  m.def(
      "sketch_dense",
      [](const TensorView& X, const TensorView& out, uint32_t seed, uint32_t stream, decomp::Distribution dist,
         uint64_t offset, float scale, int num_threads, uintptr_t cuda_stream) {
        py::gil_scoped_release release;
        decomp::sketch_dense(X, out, sketch_params(seed, stream, dist, offset, scale, num_threads, cuda_stream));
      },
      py::arg("X"), py::arg("out"), py::arg("seed"), py::arg("stream"), py::arg("dist"), py::arg("offset"),
      py::arg("scale"), py::arg("num_threads"), py::arg("cuda_stream"));
  m.def(
      "count_sketch",
      [](const TensorView& X, const std::optional<TensorView>& lengths, const TensorView& out, uint32_t seed,
         uint32_t stream, int num_threads, uintptr_t cuda_stream) {
        py::gil_scoped_release release;
        decomp::count_sketch(
            X, lengths ? &*lengths : nullptr, out,
            sketch_params(seed, stream, decomp::Distribution::Rademacher, 0, 1.0f, num_threads, cuda_stream));
      },
      py::arg("X"), py::arg("lengths"), py::arg("out"), py::arg("seed"), py::arg("stream"), py::arg("num_threads"),
      py::arg("cuda_stream"));
  m.def(
      "kronecker_sketch",
      [](const TensorView& A, const TensorView& G, const TensorView& S_out, const TensorView& S_in,
         const std::optional<TensorView>& lengths, const TensorView& out, int num_threads) {
        py::gil_scoped_release release;
        decomp::kronecker_sketch(A, G, S_out, S_in, lengths ? &*lengths : nullptr, out, num_threads);
      },
      py::arg("A"), py::arg("G"), py::arg("S_out"), py::arg("S_in"), py::arg("lengths"), py::arg("out"),
      py::arg("num_threads"));
}
