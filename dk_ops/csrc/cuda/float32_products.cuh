// The local path's GEMMs on float32 columns, in TF32 or not as the driver asks (float32_product,
// ../deform_kernel_conv2d.h). On a GPU they run in cuBLAS, which takes TF32 from PyTorch's
// switch torch.backends.cuda.matmul.allow_tf32: it is set for the call. Emulated on a CPU, the
// operands are rounded to TF32, which is what the tensor cores multiply (products of TF32
// values are exact in float32, and the sums are float32 on both).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <cstdint>

namespace dk_ops::cuda_kernels {

#ifdef DK_EMULATED_CUDA
// x with its float32 mantissa rounded to TF32's 10 bits: to nearest, ties to even, on the bits
// (infinities and NaN as they are).
inline at::Tensor round_to_tf32(const at::Tensor& x) {
  constexpr int kDroppedBits = 23 - 10;
  constexpr int32_t kDropped = (1 << kDroppedBits) - 1;
  const auto bits = x.contiguous().view(at::kInt);
  const auto kept_lowest = bits.bitwise_right_shift(kDroppedBits).bitwise_and(1);
  const auto rounded =
      bits.add(kept_lowest).add(kDropped / 2).bitwise_and(~kDropped).view(at::kFloat);
  return at::where(x.isfinite(), rounded, x);
}
#else
// Sets PyTorch's cuBLAS TF32 switch for its lifetime; touches it only where it differs.
class CublasTf32 {
 public:
  explicit CublasTf32(bool tf32) : saved_(at::globalContext().allowTF32CuBLAS()), tf32_(tf32) {
    if (tf32_ != saved_) at::globalContext().setAllowTF32CuBLAS(tf32_);
  }
  ~CublasTf32() {
    if (tf32_ != saved_) at::globalContext().setAllowTF32CuBLAS(saved_);
  }
  CublasTf32(const CublasTf32&) = delete;
  CublasTf32& operator=(const CublasTf32&) = delete;

 private:
  const bool saved_, tf32_;
};
#endif

inline void float32_product(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                            bool accumulate, bool tf32) {
#ifdef DK_EMULATED_CUDA
  const auto operand = [tf32](const at::Tensor& t) { return tf32 ? round_to_tf32(t) : t; };
  const at::Tensor left = operand(a), right = operand(b);
#else
  const CublasTf32 switch_for_the_call(tf32);
  const at::Tensor &left = a, &right = b;
#endif
  if (accumulate) {
    out.addmm_(left, right);
  } else {
    at::mm_out(out, left, right);
  }
}

}  // namespace dk_ops::cuda_kernels
