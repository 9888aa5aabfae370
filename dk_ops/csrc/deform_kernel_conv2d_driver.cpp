// The device-independent part of deform_kernel_conv2d: each call picks one strategy
// (select_strategy) and runs its forward or backward around the device's kernels.
//
//   bias only       an empty batch or no input channels: the sum has no terms, so the output is
//                   the bias (zeros without one) and every gradient zero
//   float32 copies  half / bfloat16 on kernels that compute in float32 only (the CPU's): the
//                   strategy of the float32 copies, its results cast back
//   global          global kernel offsets without data offsets or mask: one device kernel samples
//                   the kernel of every image (global_kernel.h), the batch runs as one grouped
//                   convolution, and one device kernel each takes the filters' gradient back to
//                   the scope and to the offsets: a handful of launches, whatever the batch and
//                   the groups
//   global, per image   the same, but one convolution per image, each image on one host thread
//                   (the CPU's kernels, with at least as many images as threads:
//                   convolves_image_by_image)
//   implicit GEMM   opt-in (DriverSettings), where the device has them (CUDA): the forward's
//                   output and the backward's weight gradient without Z in memory; the other
//                   gradients as on the columns
//   depthwise       groups == C_in == C_out, where the device has its kernels: no columns; each
//                   (location, tap, offset group) samples its scope once for the group's channels
//                   (depthwise.h), one device function for the forward, one for the backward
//   columns         the default local path, per chunk of columns (deform_kernel_conv2d.h), per
//                   group:
//       forward   out[cols]  = Z @ W'^T          W' = weight as (C_out, S*C_in/g)
//       backward  grad W'^T += Z^T @ gO[cols]    (BLAS runs it faster than gO^T @ Z: see below)
//                 grad Z     = gO[cols] @ W'     -> input / offset / mask gradients
//                   with the output and its gradient as channels-last rows (N*L, C_out): BLAS
//                   runs these shapes faster than their transposes when C_out is small (2-3x at
//                   C_out = 32).
// Another way to compute the local path (tensor cores, say) is one more Strategy, chosen in
// select_strategy, with its forward and backward functions.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "cpu/huge_pages.h"
#include "deform_kernel_conv2d.h"

namespace dk_ops {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

// ------------------------------------------------------------------ settings and strategies

// The driver's switches, read from the environment once per call (read_settings), so that a
// benchmark or a test can change them between calls; a bad value raises whatever the strategy.
struct DriverSettings {
  // DK_OPS_LOCAL_KERNELS: unset for the op's choice, "columns" for the scope columns also where
  // the depthwise path would run, "implicit_gemm" for the device's implicit GEMMs where it has
  // them (CUDA; no GPU has timed them: docs/gpu.md).
  bool columns = false;
  bool implicit_gemm = false;
  // DK_OPS_MAX_COLUMN_BYTES, a positive integer: the bytes of one chunk of scope columns, in place
  // of the default chunking; it also cuts the implicit GEMMs' columns into chunks (the tests do,
  // to start chunks mid-tile).
  std::optional<int64_t> max_column_bytes;
  // DK_OPS_GLOBAL_CONVOLUTION: "grouped" or "per_image" runs global DK's convolutions so in place
  // of the rule (convolves_image_by_image; per image only where the device kernels can), so that
  // a benchmark can time both in one run; unset for the rule.
  std::optional<bool> global_per_image;
};

DriverSettings read_settings() {
  DriverSettings settings;
  if (const char* env = std::getenv("DK_OPS_LOCAL_KERNELS"); env != nullptr && *env != '\0') {
    settings.columns = std::string_view(env) == "columns";
    settings.implicit_gemm = std::string_view(env) == "implicit_gemm";
    TORCH_CHECK_VALUE(settings.columns || settings.implicit_gemm,
                      "DK_OPS_LOCAL_KERNELS must be 'columns' or 'implicit_gemm' (or unset), got '",
                      env, "'");
  }
  if (const char* env = std::getenv("DK_OPS_MAX_COLUMN_BYTES"); env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long long bytes = std::strtoll(env, &end, 10);
    TORCH_CHECK_VALUE(end != env && *end == '\0' && bytes > 0,
                      "DK_OPS_MAX_COLUMN_BYTES must be a positive integer, got '", env, "'");
    settings.max_column_bytes = bytes;
  }
  if (const char* env = std::getenv("DK_OPS_GLOBAL_CONVOLUTION"); env != nullptr && *env != '\0') {
    TORCH_CHECK_VALUE(std::string_view(env) == "grouped" || std::string_view(env) == "per_image",
                      "DK_OPS_GLOBAL_CONVOLUTION must be 'grouped' or 'per_image' (or unset), got '",
                      env, "'");
    settings.global_per_image = std::string_view(env) == "per_image";
  }
  return settings;
}

// The op's tensors, checked (bias is absent in the backward).
struct Operands {
  Tensor input, weight, kernel_offset;
  OptionalTensor data_offset, mask, bias;
};

enum class Strategy {
  kBiasOnly,
  kFloat32Copies,
  kGlobal,
  kGlobalPerImage,
  kImplicitGemm,
  kDepthwise,
  kColumns
};
enum class Pass { kForward, kBackward };

// The global path's one rule of formulation: one convolution per image, each image on one host
// thread, where the device kernels run images so (the CPU's) and the batch has an image for every
// thread, so that none idles; otherwise the batch as one grouped convolution (on a GPU, one
// launch). oneDNN's grouped convolution of the batch scales poorly over threads: with it, global
// DK at c5, batch 8, took 1.28-1.48x of F.conv2d's time, per image 1.12-1.18x (docs/speed.md).
// The rule reads the thread count, but each image's results are the same bits on any number of
// threads.
bool convolves_image_by_image(const DeviceKernels& kernels, const DriverSettings& settings,
                              const DeformKernelGeometry& g) {
  if (kernels.global.for_each_image_on_one_thread == nullptr) return false;
  return settings.global_per_image.value_or(g.batch >= at::get_num_threads());
}

bool is_reduced_precision(const Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

Strategy select_strategy(const DeviceKernels& kernels, const DriverSettings& settings,
                         const DeformKernelGeometry& g, const Operands& t, Pass pass) {
  if (g.batch == 0 || g.in_channels == 0) return Strategy::kBiasOnly;
  if (is_reduced_precision(t.input) && !kernels.takes_half_and_bfloat16) {
    return Strategy::kFloat32Copies;
  }
  if (g.global_kernel_offset && !t.data_offset && !t.mask) {
    return convolves_image_by_image(kernels, settings, g) ? Strategy::kGlobalPerImage
                                                          : Strategy::kGlobal;
  }
  const bool device_has_implicit_gemm = pass == Pass::kForward
                                            ? kernels.local.implicit_gemm_forward != nullptr
                                            : kernels.local.implicit_gemm_weight_grad != nullptr;
  if (settings.implicit_gemm && device_has_implicit_gemm) return Strategy::kImplicitGemm;
  const bool depthwise = g.groups == g.in_channels && g.out_channels == g.in_channels;
  if (depthwise && !settings.columns && kernels.depthwise.forward != nullptr) {
    return Strategy::kDepthwise;
  }
  return Strategy::kColumns;
}

// ------------------------------------------------------------------ layouts and products

// (N, C, H_out, W_out) -> (C, N*L) columns, and back.
Tensor to_columns(const Tensor& t) {
  return t.transpose(0, 1).reshape({t.size(1), -1}).contiguous();
}
Tensor from_columns(const Tensor& columns, const DeformKernelGeometry& g) {
  return columns.view({columns.size(0), g.batch, g.out_h, g.out_w}).transpose(0, 1).contiguous();
}
Tensor columns_or_undefined(const OptionalTensor& t) {
  return t ? to_columns(*t) : Tensor();
}

// (N, C, H_out, W_out) -> (N*L, C) rows (free for a channels-last tensor), and back.
Tensor to_rows(const Tensor& t) {
  return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}).contiguous();
}
Tensor from_rows(const Tensor& rows, const DeformKernelGeometry& g) {
  return rows.view({g.batch, g.out_h, g.out_w, rows.size(1)}).permute({0, 3, 1, 2}).contiguous();
}

// The weight as (C_out, S * C_in/groups): the K dimension ordered like a row of Z.
Tensor weight_cells_last(const DeformKernelGeometry& g, const Tensor& weight) {
  return weight.reshape({g.out_channels, g.in_channels / g.groups, g.scope_cells()})
      .transpose(1, 2)
      .reshape({g.out_channels, -1});
}

// Part `group` of dimension `dim` split into `groups` equal parts.
Tensor group_part(const Tensor& t, int64_t dim, int64_t groups, int64_t group) {
  const int64_t size = t.size(dim) / groups;
  return t.narrow(dim, group * size, size);
}

// The dtype sums are kept in: float32 for half / bfloat16, which reach the code below only with
// kernels that take them (the CUDA ones; the CPU's compute them in float32 throughout).
at::ScalarType sum_dtype(const Tensor& t) {
  return is_reduced_precision(t) ? at::kFloat : t.scalar_type();
}
// The TF32 switch of cuDNN's convolutions: torch.backends.cudnn.allow_tf32, or, where set,
// torch.backends.cudnn.conv.fp32_precision. Torch 2.13 and later are asked for the
// convolutions' own (asked for cuDNN's as a whole, they raise where convolutions and RNNs
// differ); older ones, whose API this build has not seen, for the legacy switch.
bool convolutions_allow_tf32() {
#if TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 13
  return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
#else
  return at::globalContext().allowTF32CuDNN();
#endif
}

// out = a @ b, or out += a @ b where `accumulate`. Float32 products go to the device's
// float32_product where it has one, in TF32 where cuDNN's convolutions would be. A float32 sum
// of half / bfloat16 products gets each product rounded once, where a sum in their dtype would
// round at every addition.
void multiply(const ColumnKernels& kernels, Tensor out, const Tensor& a, const Tensor& b,
              bool accumulate) {
  if (a.scalar_type() == at::kFloat && kernels.float32_product != nullptr) {
    kernels.float32_product(out, a, b, accumulate, convolutions_allow_tf32());
  } else if (!accumulate) {
    at::mm_out(out, a, b);
  } else if (out.scalar_type() == a.scalar_type()) {
    out.addmm_(a, b);
  } else {
    out.add_(at::mm(a, b));
  }
}

OptionalTensor contiguous(const OptionalTensor& t) {
  return t ? OptionalTensor(t->contiguous()) : std::nullopt;
}

// ------------------------------------------------------------------ gradients

// Which of the backward op's gradients (input, weight, kernel_offset, data_offset, mask) are
// wanted; data_offset's and mask's only where the call has them.
struct WantedGradients {
  bool input, weight, kernel_offset, data_offset, mask;

  bool offsets_or_mask() const { return kernel_offset || data_offset || mask; }
};

using Gradients = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// The backward op's results from the gradients a strategy computed, in the op's order; an
// undefined one that is wanted (no path leads to it) is zeros. Outputs of an op must not alias
// each other, so every unwanted gradient is its own empty tensor; wanted ones are contiguous, as
// the fake kernel promises.
Gradients op_results(const Operands& t, const WantedGradients& wanted,
                     const std::array<Tensor, 5>& grads) {
  auto result = [&](bool needed, const Tensor& grad, const Tensor& like) {
    if (!needed) return at::empty({0}, t.input.options());
    return grad.defined() ? grad.contiguous() : at::zeros_like(like, at::MemoryFormat::Contiguous);
  };
  return {result(wanted.input, grads[0], t.input), result(wanted.weight, grads[1], t.weight),
          result(wanted.kernel_offset, grads[2], t.kernel_offset),
          result(wanted.data_offset, grads[3], wanted.data_offset ? *t.data_offset : Tensor()),
          result(wanted.mask, grads[4], wanted.mask ? *t.mask : Tensor())};
}

// ------------------------------------------------------------------ bias only

Tensor forward_bias_only(const DeformKernelGeometry& g, const Operands& t) {
  auto output = at::zeros({g.batch, g.out_channels, g.out_h, g.out_w}, t.input.options());
  if (t.bias) output.add_(t.bias->view({1, -1, 1, 1}));
  return output;
}

Gradients backward_bias_only(const Operands& t, const WantedGradients& wanted) {
  return op_results(t, wanted, {});
}

// ------------------------------------------------------------------ float32 copies

OptionalTensor to_float(const OptionalTensor& t) {
  return t ? OptionalTensor(t->to(at::kFloat)) : std::nullopt;
}

Operands float32_copies(const Operands& t) {
  return {t.input.to(at::kFloat), t.weight.to(at::kFloat), t.kernel_offset.to(at::kFloat),
          to_float(t.data_offset),  to_float(t.mask),         to_float(t.bias)};
}

Tensor run_forward(const DeviceKernels& kernels, const DriverSettings& settings,
                   const DeformKernelGeometry& g, const Operands& t);
Gradients run_backward(const DeviceKernels& kernels, const DriverSettings& settings,
                       const DeformKernelGeometry& g, const Operands& t,
                       const Tensor& grad_output, const WantedGradients& wanted);

Tensor forward_float32_copies(const DeviceKernels& kernels, const DriverSettings& settings,
                              const DeformKernelGeometry& g, const Operands& t) {
  return run_forward(kernels, settings, g, float32_copies(t)).to(t.input.scalar_type());
}

Gradients backward_float32_copies(const DeviceKernels& kernels, const DriverSettings& settings,
                                  const DeformKernelGeometry& g, const Operands& t,
                                  const Tensor& grad_output, const WantedGradients& wanted) {
  const auto [input, weight, kernel_offset, data_offset, mask] = run_backward(
      kernels, settings, g, float32_copies(t), grad_output.to(at::kFloat), wanted);
  const auto dtype = t.input.scalar_type();
  return {input.to(dtype), weight.to(dtype), kernel_offset.to(dtype), data_offset.to(dtype),
          mask.to(dtype)};
}

// ------------------------------------------------------------------ global kernel offsets

// One kernel per image: (N * C_out, C_in/groups, K_h, K_w) filters for the batched conv, sampled
// by one device kernel.
Tensor global_filters(const GlobalKernels& kernels, const DeformKernelGeometry& g,
                      const Tensor& weight, const Tensor& kernel_offset) {
  auto filters = at::empty({g.batch * g.out_channels, g.in_channels / g.groups, g.kernel_h,
                            g.kernel_w},
                           weight.options());
  RECORD_FUNCTION("dk_ops::sample_global_filters", std::vector<c10::IValue>());
  kernels.sample_filters(g, weight, kernel_offset, filters);
  return filters;
}

// The convolution of the op's geometry with `groups` groups, and its backward.
Tensor convolve(const DeformKernelGeometry& g, const Tensor& input, const Tensor& filters,
                const OptionalTensor& bias, int64_t groups) {
  return at::convolution(input, filters, bias, {g.stride_h, g.stride_w}, {g.pad_h, g.pad_w},
                         {g.dilation_h, g.dilation_w}, false, {0, 0}, groups);
}
std::tuple<Tensor, Tensor, Tensor> convolve_backward(const DeformKernelGeometry& g,
                                                     const Tensor& grad_output,
                                                     const Tensor& input, const Tensor& filters,
                                                     int64_t groups, bool input_grad,
                                                     bool filters_grad) {
  return at::convolution_backward(grad_output, input, filters, std::nullopt,
                                  {g.stride_h, g.stride_w}, {g.pad_h, g.pad_w},
                                  {g.dilation_h, g.dilation_w}, false, {0, 0}, groups,
                                  {input_grad, filters_grad, false});
}

// The filters' gradient taken back to the scope and to the offsets, one device kernel each.
void scope_and_offset_grads(const GlobalKernels& kernels, const DeformKernelGeometry& g,
                            const Tensor& weight, const Tensor& kernel_offset,
                            const Tensor& grad_filters, const WantedGradients& wanted,
                            std::array<Tensor, 5>& grads) {
  if (wanted.weight) {
    grads[1] = at::empty_like(weight);
    RECORD_FUNCTION("dk_ops::global_weight_grad", std::vector<c10::IValue>());
    kernels.weight_grad(g, grad_filters, kernel_offset, grads[1]);
  }
  if (wanted.kernel_offset) {
    grads[2] = at::empty_like(kernel_offset);
    RECORD_FUNCTION("dk_ops::global_offset_grad", std::vector<c10::IValue>());
    kernels.offset_grad(g, grad_filters, weight, kernel_offset, grads[2]);
  }
}

// --- the batch as one grouped convolution

// The batch as one image of N * C channels.
Tensor batch_as_channels(const Tensor& t) {
  return t.reshape({1, t.size(0) * t.size(1), t.size(2), t.size(3)});
}

Tensor forward_global(const GlobalKernels& kernels, const DeformKernelGeometry& g,
                      const Operands& t) {
  const auto input = t.input.contiguous();
  const auto filters = global_filters(kernels, g, t.weight.contiguous(),
                                      t.kernel_offset.contiguous());
  const auto bias = contiguous(t.bias);
  const OptionalTensor batch_bias = bias ? OptionalTensor(bias->repeat({g.batch})) : std::nullopt;
  return convolve(g, batch_as_channels(input), filters, batch_bias, g.batch * g.groups)
      .view({g.batch, g.out_channels, g.out_h, g.out_w});
}

// The convolution's backward gives the input's and the filters' gradients.
Gradients backward_global(const GlobalKernels& kernels, const DeformKernelGeometry& g,
                          const Operands& t, const Tensor& grad_output,
                          const WantedGradients& wanted) {
  const auto input = t.input.contiguous(), weight = t.weight.contiguous();
  const auto kernel_offset = t.kernel_offset.contiguous();
  const bool need_filters = wanted.weight || wanted.kernel_offset;
  auto [grad_batch_input, grad_filters, unused_grad_bias] = convolve_backward(
      g, batch_as_channels(grad_output.contiguous()), batch_as_channels(input),
      global_filters(kernels, g, weight, kernel_offset), g.batch * g.groups, wanted.input,
      need_filters);
  std::array<Tensor, 5> grads;
  if (wanted.input) grads[0] = grad_batch_input.view_as(input);
  if (need_filters) {
    scope_and_offset_grads(kernels, g, weight, kernel_offset, grad_filters.contiguous(), wanted,
                           grads);
  }
  return op_results(t, wanted, grads);
}

// --- one convolution per image, each on one host thread
//
// Each image's filters are sampled on its thread, into a buffer of one image's filters: the
// batch's would be a fresh allocation of N x C_out x C_in/groups x taps values on every call
// (75 MB at c5, batch 8), whose pages the OS maps and zeroes anew each time.

// Image n's filters (C_out, C_in/groups, K_h, K_w), sampled by the device kernel.
Tensor image_filters(const GlobalKernels& kernels, const DeformKernelGeometry& g,
                     const Tensor& weight, const Tensor& kernel_offset, int64_t n) {
  DeformKernelGeometry image = g;
  image.batch = 1;
  return global_filters(kernels, image, weight, kernel_offset.narrow(0, n, 1));
}

Tensor forward_global_per_image(const GlobalKernels& kernels, const DeformKernelGeometry& g,
                                const Operands& t) {
  const auto input = t.input.contiguous(), weight = t.weight.contiguous();
  const auto kernel_offset = t.kernel_offset.contiguous();
  const auto bias = contiguous(t.bias);
  auto output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
  kernels.for_each_image_on_one_thread(g.batch, [&](int64_t n) {
    const auto filters = image_filters(kernels, g, weight, kernel_offset, n);
    output.narrow(0, n, 1).copy_(convolve(g, input.narrow(0, n, 1), filters, bias, g.groups));
  });
  return output;
}

Gradients backward_global_per_image(const GlobalKernels& kernels, const DeformKernelGeometry& g,
                                    const Operands& t, const Tensor& grad_output,
                                    const WantedGradients& wanted) {
  const auto input = t.input.contiguous(), weight = t.weight.contiguous();
  const auto kernel_offset = t.kernel_offset.contiguous();
  const auto grad_out = grad_output.contiguous();
  const bool need_filters = wanted.weight || wanted.kernel_offset;
  std::array<Tensor, 5> grads;
  if (wanted.input) grads[0] = at::empty_like(input);
  // The scope's gradient sums over images, so the filters' gradients of the whole batch.
  Tensor grad_filters =
      need_filters ? at::empty({g.batch * g.out_channels, g.in_channels / g.groups, g.kernel_h,
                                g.kernel_w},
                               weight.options())
                   : Tensor();
  kernels.for_each_image_on_one_thread(g.batch, [&](int64_t n) {
    auto [grad_image, grad_image_filters, unused_grad_bias] = convolve_backward(
        g, grad_out.narrow(0, n, 1), input.narrow(0, n, 1),
        image_filters(kernels, g, weight, kernel_offset, n), g.groups, wanted.input,
        need_filters);
    if (wanted.input) grads[0].narrow(0, n, 1).copy_(grad_image);
    if (need_filters) {
      grad_filters.narrow(0, n * g.out_channels, g.out_channels).copy_(grad_image_filters);
    }
  });
  if (need_filters) {
    scope_and_offset_grads(kernels, g, weight, kernel_offset, grad_filters, wanted, grads);
  }
  return op_results(t, wanted, grads);
}

// ------------------------------------------------------------------ the local path's chunks

// The local path samples and multiplies the columns chunk by chunk, so the buffer stays
// bounded (ColumnChunking). On CPU a chunk of 4 MB is still in cache when the GEMM reads what
// the sampling pass has just written, but never fewer than 512 columns, the GEMMs' N, below
// which MKL loses more than the cache saves (2-core EPYC, forward+backward: c3 scope 4 ran
// 2.75x of F.conv2d at 4 MB / 512 columns against 3.23x at 16 MB; c5 scope 4 ran 2.69x at
// 4 MB / 128 columns against 2.34x at 16 MB / 512 columns). A GPU takes ceil(S / taps) chunks
// of the batch: 16 MB chunks made c3 (128 channels, 100 x 100, scope 4) 79 chunks at batch 16,
// 567 launches a training step against 84 at batch 2 (tests/test_op_local_launches.py's count).
int64_t columns_per_chunk(const ColumnKernels& kernels, const DeformKernelGeometry& g,
                          const Tensor& input, const DriverSettings& settings) {
  // Positive: no input channels take the bias-only strategy, and the scope is at least a tap.
  const int64_t per_column = g.in_channels * g.scope_cells() * input.element_size();
  TORCH_INTERNAL_ASSERT(per_column > 0, "columns_per_chunk: a column of no bytes");
  if (settings.max_column_bytes) {
    return std::max<int64_t>(1, *settings.max_column_bytes / per_column);
  }
  if (kernels.chunking == ColumnChunking::kFewPerBatch) {
    const int64_t chunks = (g.scope_cells() + g.taps() - 1) / g.taps();
    return std::max<int64_t>(1, (g.batch * g.positions() + chunks - 1) / chunks);
  }
  return std::max<int64_t>(512, (int64_t{4} << 20) / per_column);
}

// The implicit GEMMs keep no Z to bound, so they take all the columns at once, unless
// DK_OPS_MAX_COLUMN_BYTES asks for chunks.
int64_t implicit_gemm_columns_per_chunk(const ColumnKernels& kernels,
                                        const DeformKernelGeometry& g, const Tensor& input,
                                        const DriverSettings& settings) {
  return settings.max_column_bytes ? columns_per_chunk(kernels, g, input, settings)
                                   : g.batch * g.positions();
}

// The batch's tensors in the layouts the column kernels read, as a chunk whose range (first,
// count) for_each_chunk sets. Global offsets combined with data offsets or a mask are broadcast
// to every location.
ColumnChunk batch_in_column_layout(const DeformKernelGeometry& g, const Operands& t) {
  const Tensor local_offset =
      g.global_kernel_offset
          ? t.kernel_offset.view({g.batch, -1, 1, 1}).expand({-1, -1, g.out_h, g.out_w})
          : t.kernel_offset;
  return {g, 0, 0, t.input.permute({0, 2, 3, 1}).contiguous(), to_columns(local_offset),
          columns_or_undefined(t.data_offset), columns_or_undefined(t.mask)};
}

// Room for the scope columns, or their gradient, of one chunk of at most `step` columns.
Tensor chunk_rows_buffer(const DeformKernelGeometry& g, int64_t step, const Tensor& input) {
  return at::empty({std::min(step, g.batch * g.positions()), g.scope_cells() * g.in_channels},
                   input.options());
}

// Runs visit() with the chunk's range set to each run of `step` columns of the batch in turn.
template <typename Visit>
void for_each_chunk(ColumnChunk& chunk, int64_t step, Visit&& visit) {
  const int64_t columns = chunk.g.batch * chunk.g.positions();
  for (chunk.first = 0; chunk.first < columns; chunk.first += step) {
    chunk.count = std::min(step, columns - chunk.first);
    visit();
  }
}

// The output from its rows (N*L, C_out), plus the bias.
Tensor output_from_rows(const Tensor& out_rows, const DeformKernelGeometry& g,
                        const OptionalTensor& bias) {
  auto output = from_rows(out_rows, g);
  if (bias) output.add_(bias->view({1, -1, 1, 1}));
  return output;
}

// The column passes, each a named range in torch.profiler traces.
void scatter_scope_columns(const ColumnKernels& kernels, const ColumnChunk& chunk, Tensor& z) {
  RECORD_FUNCTION("dk_ops::scatter_scope_columns", std::vector<c10::IValue>());
  kernels.scatter_scope_columns(chunk, z);
}
void gather_input_grad(const ColumnKernels& kernels, const ColumnChunk& chunk,
                       const Tensor& grad_z, Tensor& grad_input) {
  RECORD_FUNCTION("dk_ops::gather_input_grad", std::vector<c10::IValue>());
  kernels.gather_input_grad(chunk, grad_z, grad_input);
}
void offset_and_mask_grads(const ColumnKernels& kernels, const ColumnChunk& chunk,
                           const Tensor& grad_z, Tensor& grad_kernel_offset,
                           Tensor& grad_data_offset, Tensor& grad_mask) {
  RECORD_FUNCTION("dk_ops::offset_and_mask_grads", std::vector<c10::IValue>());
  kernels.offset_and_mask_grads(chunk, grad_z, grad_kernel_offset, grad_data_offset, grad_mask);
}

// What the local strategies' backward works on: the batch in column layouts, the weight as W'
// and the output gradient as channels-last rows (N*L, C_out).
struct LocalBackward {
  ColumnChunk chunk;
  Tensor weight_rows, grad_out_rows;
};

// grad W'^T of each group, (groups, S*C_in/g, C_out/g), summed in float32 for half / bfloat16.
Tensor zero_weight_grad_columns(const DeformKernelGeometry& g, const LocalBackward& local) {
  return at::zeros({g.groups, local.weight_rows.size(1), g.out_channels / g.groups},
                   local.weight_rows.options().dtype(sum_dtype(local.weight_rows)));
}

// The weight's gradient from grad W'^T (groups, S*C_in/g, C_out/g).
Tensor weight_grad_from_columns(const DeformKernelGeometry& g, const Tensor& grad_weight_cols,
                                const Tensor& weight) {
  return grad_weight_cols.transpose(1, 2)
      .reshape({g.out_channels, g.scope_cells(), -1})
      .transpose(1, 2)
      .reshape(weight.sizes())
      .to(weight.scalar_type());  // a no-op unless summed in float32
}

// The input, kernel offset, data offset and mask gradients, through grad Z = gO @ W' chunk by
// chunk, and the weight's from grad_weight_cols (undefined where not wanted).
Gradients gradients_through_grad_z(const ColumnKernels& kernels, const DriverSettings& settings,
                                   LocalBackward& local, const Operands& t,
                                   const WantedGradients& wanted,
                                   const Tensor& grad_weight_cols) {
  const auto& g = local.chunk.g;
  auto& chunk = local.chunk;
  // The input gradient sums over taps and chunks: in float32 for half / bfloat16.
  Tensor grad_input_cl =
      wanted.input ? at::zeros_like(chunk.input, sum_dtype(chunk.input)) : Tensor();
  Tensor grad_kernel_columns =
      wanted.kernel_offset ? at::zeros_like(chunk.kernel_offset) : Tensor();
  Tensor grad_data_columns = wanted.data_offset ? at::zeros_like(chunk.data_offset) : Tensor();
  Tensor grad_mask_columns = wanted.mask ? at::zeros_like(chunk.mask) : Tensor();
  if (wanted.input || wanted.offsets_or_mask()) {
    const int64_t step = columns_per_chunk(kernels, g, chunk.input, settings);
    auto grad_z = chunk_rows_buffer(g, step, chunk.input);
    for_each_chunk(chunk, step, [&] {
      const auto grad_out_chunk = local.grad_out_rows.narrow(0, chunk.first, chunk.count);
      auto grad_z_chunk = grad_z.narrow(0, 0, chunk.count);
      for (int64_t group = 0; group < g.groups; ++group) {
        auto grad_z_part = group_part(grad_z_chunk, 1, g.groups, group);
        multiply(kernels, grad_z_part, group_part(grad_out_chunk, 1, g.groups, group),
                 group_part(local.weight_rows, 0, g.groups, group), /*accumulate=*/false);
      }
      if (wanted.input) gather_input_grad(kernels, chunk, grad_z_chunk, grad_input_cl);
      if (wanted.offsets_or_mask()) {
        offset_and_mask_grads(kernels, chunk, grad_z_chunk, grad_kernel_columns,
                              grad_data_columns, grad_mask_columns);
      }
    });
  }
  std::array<Tensor, 5> grads;
  if (wanted.input) {
    grads[0] = grad_input_cl.permute({0, 3, 1, 2}).contiguous().to(t.input.scalar_type());
  }
  if (wanted.weight) grads[1] = weight_grad_from_columns(g, grad_weight_cols, t.weight);
  if (wanted.kernel_offset) {
    grads[2] = from_columns(grad_kernel_columns, g);
    if (g.global_kernel_offset) grads[2] = grads[2].sum({2, 3});
  }
  if (wanted.data_offset) grads[3] = from_columns(grad_data_columns, g);
  if (wanted.mask) grads[4] = from_columns(grad_mask_columns, g);
  return op_results(t, wanted, grads);
}

// The local strategies' backward: add_weight_grad(local, grad_weight_cols) sums grad W'^T where
// the weight's gradient is wanted, the other gradients go through grad Z.
template <typename AddWeightGrad>
Gradients local_backward(const ColumnKernels& kernels, const DriverSettings& settings,
                         const DeformKernelGeometry& g, const Operands& t,
                         const Tensor& grad_output, const WantedGradients& wanted,
                         AddWeightGrad&& add_weight_grad) {
  LocalBackward local{batch_in_column_layout(g, t), weight_cells_last(g, t.weight),
                      to_rows(grad_output)};
  Tensor grad_weight_cols;
  if (wanted.weight) {
    grad_weight_cols = zero_weight_grad_columns(g, local);
    add_weight_grad(local, grad_weight_cols);
  }
  return gradients_through_grad_z(kernels, settings, local, t, wanted, grad_weight_cols);
}

// ------------------------------------------------------------------ columns

Tensor forward_columns(const ColumnKernels& kernels, const DriverSettings& settings,
                       const DeformKernelGeometry& g, const Operands& t) {
  auto chunk = batch_in_column_layout(g, t);
  auto out_rows = at::empty({g.batch * g.positions(), g.out_channels}, t.input.options());
  const auto weight_rows = weight_cells_last(g, t.weight);
  const int64_t step = columns_per_chunk(kernels, g, t.input, settings);
  auto z = chunk_rows_buffer(g, step, t.input);
  for_each_chunk(chunk, step, [&] {
    auto z_chunk = z.narrow(0, 0, chunk.count);
    scatter_scope_columns(kernels, chunk, z_chunk);
    const auto out_chunk = out_rows.narrow(0, chunk.first, chunk.count);
    for (int64_t group = 0; group < g.groups; ++group) {
      auto out_part = group_part(out_chunk, 1, g.groups, group);
      multiply(kernels, out_part, group_part(z_chunk, 1, g.groups, group),
               group_part(weight_rows, 0, g.groups, group).t(), /*accumulate=*/false);
    }
  });
  return output_from_rows(out_rows, g, t.bias);
}

Gradients backward_columns(const ColumnKernels& kernels, const DriverSettings& settings,
                           const DeformKernelGeometry& g, const Operands& t,
                           const Tensor& grad_output, const WantedGradients& wanted) {
  // grad W'^T += Z^T @ gO chunk by chunk: Z^T @ gO ran 15-20% faster than the transposed
  // product gO^T @ Z in MKL (2-core EPYC, c3 scope 4 chunks: 150 vs 125 GFLOP/s).
  return local_backward(kernels, settings, g, t, grad_output, wanted,
                        [&](LocalBackward& local, Tensor& grad_weight_cols) {
    auto& chunk = local.chunk;
    const int64_t step = columns_per_chunk(kernels, g, chunk.input, settings);
    auto z = chunk_rows_buffer(g, step, chunk.input);
    for_each_chunk(chunk, step, [&] {
      auto z_chunk = z.narrow(0, 0, chunk.count);
      scatter_scope_columns(kernels, chunk, z_chunk);
      const auto grad_out_chunk = local.grad_out_rows.narrow(0, chunk.first, chunk.count);
      for (int64_t group = 0; group < g.groups; ++group) {
        multiply(kernels, grad_weight_cols[group], group_part(z_chunk, 1, g.groups, group).t(),
                 group_part(grad_out_chunk, 1, g.groups, group), /*accumulate=*/true);
      }
    });
  });
}

// ------------------------------------------------------------------ implicit GEMM

Tensor forward_implicit_gemm(const ColumnKernels& kernels, const DriverSettings& settings,
                             const DeformKernelGeometry& g, const Operands& t) {
  auto chunk = batch_in_column_layout(g, t);
  auto out_rows = at::empty({g.batch * g.positions(), g.out_channels}, t.input.options());
  const auto weight = t.weight.contiguous();
  for_each_chunk(chunk, implicit_gemm_columns_per_chunk(kernels, g, t.input, settings), [&] {
    auto out_chunk = out_rows.narrow(0, chunk.first, chunk.count);
    RECORD_FUNCTION("dk_ops::implicit_gemm_forward", std::vector<c10::IValue>());
    kernels.implicit_gemm_forward(chunk, weight, out_chunk);
  });
  return output_from_rows(out_rows, g, t.bias);
}

Gradients backward_implicit_gemm(const ColumnKernels& kernels, const DriverSettings& settings,
                                 const DeformKernelGeometry& g, const Operands& t,
                                 const Tensor& grad_output, const WantedGradients& wanted) {
  return local_backward(kernels, settings, g, t, grad_output, wanted,
                        [&](LocalBackward& local, Tensor& grad_weight_cols) {
    auto& chunk = local.chunk;
    const int64_t step = implicit_gemm_columns_per_chunk(kernels, g, chunk.input, settings);
    for_each_chunk(chunk, step, [&] {
      const auto grad_out_chunk = local.grad_out_rows.narrow(0, chunk.first, chunk.count);
      RECORD_FUNCTION("dk_ops::implicit_gemm_weight_grad", std::vector<c10::IValue>());
      kernels.implicit_gemm_weight_grad(chunk, grad_out_chunk, grad_weight_cols);
    });
  });
}

// ------------------------------------------------------------------ depthwise

// The operands in the depthwise kernels' layouts; global offsets broadcast to every location.
DepthwiseOperands depthwise_operands(const DeformKernelGeometry& g, const Operands& t) {
  const Tensor local_offset =
      g.global_kernel_offset
          ? t.kernel_offset.view({g.batch, -1, 1, 1}).expand({-1, -1, g.out_h, g.out_w})
          : t.kernel_offset;
  auto contiguous_or_undefined = [](const OptionalTensor& o) {
    return o ? o->contiguous() : Tensor();
  };
  return {g,
          t.input.contiguous(),
          t.weight.reshape({g.in_channels, g.scope_cells()}).contiguous(),
          local_offset.contiguous(),
          contiguous_or_undefined(t.data_offset),
          contiguous_or_undefined(t.mask)};
}

Tensor forward_depthwise(const DepthwiseKernels& kernels, const DeformKernelGeometry& g,
                         const Operands& t) {
  const auto operands = depthwise_operands(g, t);
  auto output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, t.input.options());
  RECORD_FUNCTION("dk_ops::depthwise_forward", std::vector<c10::IValue>());
  kernels.forward(operands, output);
  if (t.bias) output.add_(t.bias->view({1, -1, 1, 1}));
  return output;
}

Gradients backward_depthwise(const DepthwiseKernels& kernels, const DeformKernelGeometry& g,
                             const Operands& t, const Tensor& grad_output,
                             const WantedGradients& wanted) {
  const auto operands = depthwise_operands(g, t);
  const auto sum_options = t.input.options().dtype(sum_dtype(t.input));
  DepthwiseGradients grads;
  if (wanted.input) grads.input = at::zeros_like(operands.input, sum_options);
  if (wanted.weight) grads.scope = at::empty_like(operands.scope, sum_options);
  // The per-channel offsets' gradients are the largest tensors of a depthwise layer.
  if (wanted.kernel_offset) grads.kernel_offset = empty_like_on_huge_pages(operands.kernel_offset);
  if (wanted.data_offset) grads.data_offset = empty_like_on_huge_pages(operands.data_offset);
  if (wanted.mask) grads.mask = at::empty_like(operands.mask);
  {
    RECORD_FUNCTION("dk_ops::depthwise_backward", std::vector<c10::IValue>());
    kernels.backward(operands, grad_output.contiguous(), grads);
  }
  const auto dtype = t.input.scalar_type();
  std::array<Tensor, 5> results;
  if (wanted.input) results[0] = grads.input.to(dtype);  // no-ops unless summed in float32
  if (wanted.weight) results[1] = grads.scope.view(t.weight.sizes()).to(dtype);
  if (wanted.kernel_offset) {
    results[2] = g.global_kernel_offset ? grads.kernel_offset.sum({2, 3}) : grads.kernel_offset;
  }
  results[3] = grads.data_offset;
  results[4] = grads.mask;
  return op_results(t, wanted, results);
}

// ------------------------------------------------------------------ one strategy per call

Tensor run_forward(const DeviceKernels& kernels, const DriverSettings& settings,
                   const DeformKernelGeometry& g, const Operands& t) {
  switch (select_strategy(kernels, settings, g, t, Pass::kForward)) {
    case Strategy::kBiasOnly:
      return forward_bias_only(g, t);
    case Strategy::kFloat32Copies:
      return forward_float32_copies(kernels, settings, g, t);
    case Strategy::kGlobal:
      return forward_global(kernels.global, g, t);
    case Strategy::kGlobalPerImage:
      return forward_global_per_image(kernels.global, g, t);
    case Strategy::kImplicitGemm:
      return forward_implicit_gemm(kernels.local, settings, g, t);
    case Strategy::kDepthwise:
      return forward_depthwise(kernels.depthwise, g, t);
    case Strategy::kColumns:
      return forward_columns(kernels.local, settings, g, t);
  }
  TORCH_INTERNAL_ASSERT(false, "deform_kernel_conv2d: no forward for the strategy");
}

Gradients run_backward(const DeviceKernels& kernels, const DriverSettings& settings,
                       const DeformKernelGeometry& g, const Operands& t,
                       const Tensor& grad_output, const WantedGradients& wanted) {
  switch (select_strategy(kernels, settings, g, t, Pass::kBackward)) {
    case Strategy::kBiasOnly:
      return backward_bias_only(t, wanted);
    case Strategy::kFloat32Copies:
      return backward_float32_copies(kernels, settings, g, t, grad_output, wanted);
    case Strategy::kGlobal:
      return backward_global(kernels.global, g, t, grad_output, wanted);
    case Strategy::kGlobalPerImage:
      return backward_global_per_image(kernels.global, g, t, grad_output, wanted);
    case Strategy::kImplicitGemm:
      return backward_implicit_gemm(kernels.local, settings, g, t, grad_output, wanted);
    case Strategy::kDepthwise:
      return backward_depthwise(kernels.depthwise, g, t, grad_output, wanted);
    case Strategy::kColumns:
      return backward_columns(kernels.local, settings, g, t, grad_output, wanted);
  }
  TORCH_INTERNAL_ASSERT(false, "deform_kernel_conv2d_backward: no backward for the strategy");
}

}  // namespace

std::pair<int64_t, int64_t> rigid_input_rows(const ColumnChunk& chunk) {
  const auto& g = chunk.g;
  const int64_t last = chunk.first + chunk.count - 1;
  const int64_t first_image = chunk.first / g.positions(), last_image = last / g.positions();
  const int64_t top = ((chunk.first % g.positions()) / g.out_w) * g.stride_h - g.pad_h;
  const int64_t bottom =
      ((last % g.positions()) / g.out_w) * g.stride_h - g.pad_h + (g.kernel_h - 1) * g.dilation_h;
  const int64_t begin = first_image * g.height + std::clamp<int64_t>(top, 0, g.height);
  const int64_t end = last_image * g.height + std::clamp<int64_t>(bottom, -1, g.height - 1) + 1;
  return {begin, std::max(begin, end)};
}

Tensor deform_kernel_conv2d_forward(
    const DeviceKernels& kernels, const Tensor& input, const Tensor& weight,
    const Tensor& kernel_offset, const OptionalTensor& data_offset, const OptionalTensor& mask,
    const OptionalTensor& bias, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    int64_t kernel_offset_groups, int64_t deform_groups) {
  const auto g = check_deform_kernel_conv2d_args(input, weight, kernel_offset, data_offset, mask,
                                                 bias, kernel_size, stride, padding, dilation,
                                                 groups, kernel_offset_groups, deform_groups);
  return run_forward(kernels, read_settings(), g,
                     {input, weight, kernel_offset, data_offset, mask, bias});
}

Gradients deform_kernel_conv2d_backward(
    const DeviceKernels& kernels, const Tensor& grad_output, const Tensor& input,
    const Tensor& weight, const Tensor& kernel_offset, const OptionalTensor& data_offset,
    const OptionalTensor& mask, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    int64_t kernel_offset_groups, int64_t deform_groups, std::array<bool, 5> output_mask) {
  const auto g = check_deform_kernel_conv2d_backward_args(
      grad_output, input, weight, kernel_offset, data_offset, mask, kernel_size, stride, padding,
      dilation, groups, kernel_offset_groups, deform_groups);
  const WantedGradients wanted{output_mask[0], output_mask[1], output_mask[2],
                               output_mask[3] && data_offset.has_value(),
                               output_mask[4] && mask.has_value()};
  return run_backward(kernels, read_settings(), g,
                      {input, weight, kernel_offset, data_offset, mask, std::nullopt},
                      grad_output, wanted);
}

}  // namespace dk_ops
