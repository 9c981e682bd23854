// A raw, non-owning view of a torch tensor: what crosses the Python/C++ boundary instead of a libtorch
// type, so that one build of the extension serves every torch version.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace decomp {

// Codes shared with python/decomp/ops.py (_DTYPE_CODES); change both together.
enum class DType : int32_t { Float32 = 0, BFloat16 = 1, Int64 = 2, Int32 = 3, Float64 = 4 };
enum class DeviceType : int32_t { CPU = 0, CUDA = 1 };

struct TensorView {
  uintptr_t ptr = 0;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements, as torch reports them
  DType dtype = DType::Float32;
  DeviceType device = DeviceType::CPU;
  int device_index = 0;

  int64_t dim() const { return static_cast<int64_t>(shape.size()); }
  int64_t size(int64_t i) const { return shape.at(static_cast<size_t>(i)); }
  int64_t stride(int64_t i) const { return strides.at(static_cast<size_t>(i)); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  bool is_contiguous() const {
    int64_t expected = 1;
    for (int64_t i = dim() - 1; i >= 0; --i) {
      if (size(i) > 1 && stride(i) != expected) return false;
      expected *= size(i);
    }
    return true;
  }
  template <class T>
  T* data() const { return reinterpret_cast<T*>(ptr); }
};

// Thrown as ValueError in Python. The Python layer gives the user-facing messages; these checks only keep a
// direct caller of decomp._C from reading out of bounds.
inline void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument(message);
}

inline std::string shape_string(const TensorView& t) {
  std::string s = "[";
  for (size_t i = 0; i < t.shape.size(); ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + "]";
}

// bfloat16 is the top half of a float32: widening is exact.
inline float bf16_to_float(uint16_t bits) {
  uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  __builtin_memcpy(&value, &widened, sizeof value);
  return value;
}

// Runs `cpu` for CPU views and `cuda` for CUDA views; a CUDA view in a build without CUDA is an error that says
// how to get a CUDA build.
template <class CpuFn, class CudaFn>
void dispatch(const TensorView& like, CpuFn cpu, CudaFn cuda) {
  if (like.device == DeviceType::CPU) return cpu();
#ifdef DECOMP_WITH_CUDA
  return cuda();
#else
  (void)cuda;
  throw std::runtime_error(
      "decomp was built without CUDA, so it cannot run on CUDA tensors; reinstall with nvcc on the PATH "
      "(DECOMP_CUDA=ON pip install .) or move the tensors to the CPU");
#endif
}

}  // namespace decomp
