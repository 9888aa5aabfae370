// The device-independent part of deform_kernel_conv2d: layouts, chunking and GEMMs of the
// local path around the per-device column kernels, and the global-offset fast path.
//
// Local path, per chunk of columns (see deform_kernel_conv2d.h), per group:
//   forward   out[cols]  = Z @ W'^T          W' = weight as (C_out, S*C_in/g)
//   backward  grad W'^T += Z^T @ gO[cols]    (BLAS runs it faster than gO^T @ Z: see below)
//             grad Z     = gO[cols] @ W'     -> input / offset / mask gradients
// with the output and its gradient as channels-last rows (N*L, C_out): BLAS runs these
// shapes faster than their transposes when C_out is small (2-3x at C_out = 32). With
// DK_OPS_LOCAL_KERNELS=implicit_gemm the device's implicit GEMMs compute out and grad W'^T
// without Z in memory, all columns at once.
// Global path (kernel_offset (N, 2*Gk*taps), no data offset, no mask): one device kernel samples
// the kernel of every image (global_kernel.h), the batch runs as one grouped convolution, and one
// device kernel each takes the filters' gradient back to the scope and to the offsets: a handful
// of launches, whatever the batch and the groups.
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "deform_kernel_conv2d.h"

namespace dk_ops {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

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

// The local path samples and multiplies the columns chunk by chunk, so the buffer stays
// bounded. On CPU a chunk of 4 MB is still in cache when the GEMM reads what the sampling
// pass has just written, but never fewer than 512 columns, the GEMMs' N, below which MKL
// loses more than the cache saves (2-core EPYC, forward+backward: c3 scope 4 ran 2.75x of
// F.conv2d at 4 MB / 512 columns against 3.23x at 16 MB; c5 scope 4 ran 2.69x at 4 MB /
// 128 columns against 2.34x at 16 MB / 512 columns). GPUs take 16 MB, enough to fill the
// device and amortise the launches.
int64_t columns_per_chunk(const DeformKernelGeometry& g, const Tensor& input) {
  const int64_t per_column = g.in_channels * g.scope_cells() * input.element_size();
  if (const auto bytes = column_bytes_override()) return std::max<int64_t>(1, *bytes / per_column);
  if (!input.is_cpu()) return std::max<int64_t>(1, (int64_t{16} << 20) / per_column);
  return std::max<int64_t>(512, (int64_t{4} << 20) / per_column);
}

ColumnChunk whole_batch(const DeformKernelGeometry& g, const Tensor& input,
                        const Tensor& kernel_offset, const OptionalTensor& data_offset,
                        const OptionalTensor& mask) {
  // Global offsets combined with data offsets or a mask: broadcast to every location.
  const Tensor local_offset =
      g.global_kernel_offset
          ? kernel_offset.view({g.batch, -1, 1, 1}).expand({-1, -1, g.out_h, g.out_w})
          : kernel_offset;
  return {g, 0, 0, input.permute({0, 2, 3, 1}).contiguous(), to_columns(local_offset),
          columns_or_undefined(data_offset), columns_or_undefined(mask)};
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

// DK_OPS_LOCAL_KERNELS: which kernels the local path runs, read on every call (like
// DK_OPS_MAX_COLUMN_BYTES) so that a benchmark or a test can switch between calls:
//   columns (or unset)  scope columns chunk by chunk, then GEMMs per group (the default)
//   implicit_gemm       the device's implicit GEMMs where it has them (CUDA): the forward's
//                       output and the backward's weight gradient without Z in memory (the other
//                       gradients still go through grad Z); the columns where not. Unmeasured
//                       on a GPU as yet (docs/gpu.md)
bool implicit_gemm_requested() {
  const char* env = std::getenv("DK_OPS_LOCAL_KERNELS");
  if (env == nullptr || *env == '\0' || std::string_view(env) == "columns") return false;
  TORCH_CHECK_VALUE(std::string_view(env) == "implicit_gemm",
                    "DK_OPS_LOCAL_KERNELS must be 'columns' or 'implicit_gemm' (or unset), got '",
                    env, "'");
  return true;
}

// Runs launch() over chunks of the `columns` columns: all of them at once, as the implicit GEMMs
// keep no Z to bound, unless DK_OPS_MAX_COLUMN_BYTES asks for chunks (the tests do, to start
// chunks mid-tile).
template <typename Launch>
void for_each_implicit_gemm_chunk(ColumnChunk& chunk, int64_t columns, Launch&& launch) {
  const int64_t step =
      column_bytes_override() ? columns_per_chunk(chunk.g, chunk.input) : columns;
  for (chunk.first = 0; chunk.first < columns; chunk.first += step) {
    chunk.count = std::min(step, columns - chunk.first);
    launch();
  }
}

bool is_reduced_precision(const Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}
// The dtype sums are kept in: float32 for half / bfloat16, which reach the code below only with
// kernels that take them (the CUDA ones; the CPU's compute them in float32 throughout).
at::ScalarType sum_dtype(const Tensor& t) {
  return is_reduced_precision(t) ? at::kFloat : t.scalar_type();
}
// sum += a @ b. A float32 sum of half / bfloat16 products gets each product rounded once, where
// a sum in their dtype would round at every addition.
void add_product(const Tensor& sum, const Tensor& a, const Tensor& b) {
  if (sum.scalar_type() == a.scalar_type()) {
    sum.addmm_(a, b);
  } else {
    sum.add_(at::mm(a, b));
  }
}
OptionalTensor to_float(const OptionalTensor& t) {
  return t ? OptionalTensor(t->to(at::kFloat)) : std::nullopt;
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

// The batch as one image of N * C channels.
Tensor batch_as_channels(const Tensor& t) {
  return t.reshape({1, t.size(0) * t.size(1), t.size(2), t.size(3)});
}

Tensor global_forward(const GlobalKernels& kernels, const DeformKernelGeometry& g,
                      const Tensor& input, const Tensor& weight, const Tensor& kernel_offset,
                      const OptionalTensor& bias) {
  const auto filters = global_filters(kernels, g, weight, kernel_offset);
  const OptionalTensor batch_bias = bias ? OptionalTensor(bias->repeat({g.batch})) : std::nullopt;
  return at::convolution(batch_as_channels(input), filters, batch_bias, {g.stride_h, g.stride_w},
                         {g.pad_h, g.pad_w}, {g.dilation_h, g.dilation_w}, false, {0, 0},
                         g.batch * g.groups)
      .view({g.batch, g.out_channels, g.out_h, g.out_w});
}

// Gradients of (input, weight, kernel_offset); undefined where not needed. The convolution's
// backward gives the input's and the filters' gradients; one device kernel takes the filters'
// gradient back to the scope, another to the offsets.
std::array<Tensor, 3> global_backward(const GlobalKernels& kernels, const DeformKernelGeometry& g,
                                      const Tensor& grad_output, const Tensor& input,
                                      const Tensor& weight, const Tensor& kernel_offset,
                                      std::array<bool, 3> needed) {
  const bool need_filters = needed[1] || needed[2];
  auto [grad_batch_input, grad_filters, unused_grad_bias] = at::convolution_backward(
      batch_as_channels(grad_output), batch_as_channels(input),
      global_filters(kernels, g, weight, kernel_offset), std::nullopt, {g.stride_h, g.stride_w},
      {g.pad_h, g.pad_w}, {g.dilation_h, g.dilation_w}, false, {0, 0}, g.batch * g.groups,
      {needed[0], need_filters, false});
  std::array<Tensor, 3> grads;
  if (needed[0]) grads[0] = grad_batch_input.view_as(input);
  if (!need_filters) return grads;
  grad_filters = grad_filters.contiguous();
  if (needed[1]) {
    grads[1] = at::empty_like(weight);
    RECORD_FUNCTION("dk_ops::global_weight_grad", std::vector<c10::IValue>());
    kernels.weight_grad(g, grad_filters, kernel_offset, grads[1]);
  }
  if (needed[2]) {
    grads[2] = at::empty_like(kernel_offset);
    RECORD_FUNCTION("dk_ops::global_offset_grad", std::vector<c10::IValue>());
    kernels.offset_grad(g, grad_filters, weight, kernel_offset, grads[2]);
  }
  return grads;
}

bool uses_global_path(const DeformKernelGeometry& g, const OptionalTensor& data_offset,
                      const OptionalTensor& mask) {
  return g.global_kernel_offset && !data_offset && !mask;
}

OptionalTensor contiguous(const OptionalTensor& t) {
  return t ? OptionalTensor(t->contiguous()) : std::nullopt;
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
  // Read before any path is taken, so that a wrong value raises whichever path runs.
  const bool implicit_gemm =
      implicit_gemm_requested() && kernels.local.implicit_gemm_forward != nullptr;
  if (is_reduced_precision(input) && !kernels.take_reduced_precision) {  // in float32
    return deform_kernel_conv2d_forward(kernels, input.to(at::kFloat), weight.to(at::kFloat),
                                        kernel_offset.to(at::kFloat), to_float(data_offset),
                                        to_float(mask), to_float(bias), kernel_size, stride,
                                        padding, dilation, groups, kernel_offset_groups,
                                        deform_groups)
        .to(input.scalar_type());
  }
  if (g.batch == 0) return at::empty({0, g.out_channels, g.out_h, g.out_w}, input.options());
  if (uses_global_path(g, data_offset, mask)) {
    return global_forward(kernels.global, g, input.contiguous(), weight.contiguous(),
                          kernel_offset.contiguous(), contiguous(bias));
  }
  auto chunk = whole_batch(g, input, kernel_offset, data_offset, mask);
  const int64_t columns = g.batch * g.positions();
  auto out_rows = at::empty({columns, g.out_channels}, input.options());
  if (implicit_gemm) {
    const auto contiguous_weight = weight.contiguous();
    for_each_implicit_gemm_chunk(chunk, columns, [&] {
      auto out_chunk = out_rows.narrow(0, chunk.first, chunk.count);
      RECORD_FUNCTION("dk_ops::implicit_gemm_forward", std::vector<c10::IValue>());
      kernels.local.implicit_gemm_forward(chunk, contiguous_weight, out_chunk);
    });
  } else {
    const auto weight_rows = weight_cells_last(g, weight);
    const int64_t step = columns_per_chunk(g, input);
    auto z =
        at::empty({std::min(step, columns), g.scope_cells() * g.in_channels}, input.options());
    for (chunk.first = 0; chunk.first < columns; chunk.first += step) {
      chunk.count = std::min(step, columns - chunk.first);
      auto z_chunk = z.narrow(0, 0, chunk.count);
      scatter_scope_columns(kernels.local, chunk, z_chunk);
      const auto out_chunk = out_rows.narrow(0, chunk.first, chunk.count);
      for (int64_t group = 0; group < g.groups; ++group) {
        auto out_part = group_part(out_chunk, 1, g.groups, group);
        at::mm_out(out_part, group_part(z_chunk, 1, g.groups, group),
                   group_part(weight_rows, 0, g.groups, group).t());
      }
    }
  }
  auto output = from_rows(out_rows, g);
  if (bias) output.add_(bias->view({1, -1, 1, 1}));
  return output;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> deform_kernel_conv2d_backward(
    const DeviceKernels& kernels, const Tensor& grad_output, const Tensor& input,
    const Tensor& weight, const Tensor& kernel_offset, const OptionalTensor& data_offset,
    const OptionalTensor& mask, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    int64_t kernel_offset_groups, int64_t deform_groups, std::array<bool, 5> output_mask) {
  const auto g = check_deform_kernel_conv2d_backward_args(
      grad_output, input, weight, kernel_offset, data_offset, mask, kernel_size, stride, padding,
      dilation, groups, kernel_offset_groups, deform_groups);
  // Read before any path is taken, as in the forward.
  const bool implicit_gemm =
      implicit_gemm_requested() && kernels.local.implicit_gemm_weight_grad != nullptr;
  if (is_reduced_precision(input) && !kernels.take_reduced_precision) {  // in float32
    auto grads = deform_kernel_conv2d_backward(
        kernels, grad_output.to(at::kFloat), input.to(at::kFloat), weight.to(at::kFloat),
        kernel_offset.to(at::kFloat), to_float(data_offset), to_float(mask), kernel_size, stride,
        padding, dilation, groups, kernel_offset_groups, deform_groups, output_mask);
    const auto dtype = input.scalar_type();
    return {std::get<0>(grads).to(dtype), std::get<1>(grads).to(dtype),
            std::get<2>(grads).to(dtype), std::get<3>(grads).to(dtype),
            std::get<4>(grads).to(dtype)};
  }
  const bool need_input = output_mask[0], need_weight = output_mask[1];
  const bool need_kernel_offset = output_mask[2];
  const bool need_data_offset = output_mask[3] && data_offset.has_value();
  const bool need_mask = output_mask[4] && mask.has_value();
  // Outputs of an op must not alias each other, so every unwanted gradient is its own
  // empty tensor; wanted ones are contiguous, as the fake kernel promises.
  auto empty = [&] { return at::empty({0}, input.options()); };
  auto result = [&](bool needed, const Tensor& grad, const Tensor& like) {
    if (!needed) return empty();
    return grad.defined() ? grad.contiguous() : at::zeros_like(like, at::MemoryFormat::Contiguous);
  };
  if (g.batch == 0) {
    return {result(need_input, Tensor(), input), result(need_weight, Tensor(), weight),
            result(need_kernel_offset, Tensor(), kernel_offset),
            need_data_offset ? result(true, Tensor(), *data_offset) : empty(),
            need_mask ? result(true, Tensor(), *mask) : empty()};
  }
  if (uses_global_path(g, data_offset, mask)) {
    auto grads = global_backward(kernels.global, g, grad_output.contiguous(), input.contiguous(),
                                 weight.contiguous(), kernel_offset.contiguous(),
                                 {need_input, need_weight, need_kernel_offset});
    return {result(need_input, grads[0], input), result(need_weight, grads[1], weight),
            result(need_kernel_offset, grads[2], kernel_offset), empty(), empty()};
  }

  auto chunk = whole_batch(g, input, kernel_offset, data_offset, mask);
  const auto weight_rows = weight_cells_last(g, weight);
  const auto grad_out_rows = to_rows(grad_output);
  const int64_t columns = g.batch * g.positions(), step = columns_per_chunk(g, input);
  const int64_t z_width = g.scope_cells() * g.in_channels;
  const bool need_z_grad = need_input || need_kernel_offset || need_data_offset || need_mask;

  // Gradients summed over chunks (and, by gather_input_grad, over taps) accumulate in float32
  // for half / bfloat16.
  const auto accumulate_type = sum_dtype(input);
  // grad W'^T of each group, (groups, S*C_in/g, C_out/g): Z^T @ gO ran 15-20% faster than the
  // transposed product gO^T @ Z in MKL (2-core EPYC, c3 scope 4 chunks: 150 vs 125 GFLOP/s).
  Tensor grad_weight_cols =
      need_weight ? at::zeros({g.groups, weight_rows.size(1), g.out_channels / g.groups},
                              weight_rows.options().dtype(accumulate_type))
                  : Tensor();
  Tensor grad_input_cl = need_input ? at::zeros_like(chunk.input, accumulate_type) : Tensor();
  Tensor grad_kernel_columns = need_kernel_offset ? at::zeros_like(chunk.kernel_offset) : Tensor();
  Tensor grad_data_columns = need_data_offset ? at::zeros_like(chunk.data_offset) : Tensor();
  Tensor grad_mask_columns = need_mask ? at::zeros_like(chunk.mask) : Tensor();
  // The implicit GEMM takes the weight gradient without Z; the chunks below then only carry
  // grad Z to the other gradients.
  const bool scatter_z = need_weight && !implicit_gemm;
  if (need_weight && implicit_gemm) {
    for_each_implicit_gemm_chunk(chunk, columns, [&] {
      const auto grad_out_chunk = grad_out_rows.narrow(0, chunk.first, chunk.count);
      RECORD_FUNCTION("dk_ops::implicit_gemm_weight_grad", std::vector<c10::IValue>());
      kernels.local.implicit_gemm_weight_grad(chunk, grad_out_chunk, grad_weight_cols);
    });
  }
  const int64_t chunk_rows = std::min(step, columns);
  auto z = scatter_z ? at::empty({chunk_rows, z_width}, input.options()) : Tensor();
  auto grad_z = need_z_grad ? at::empty({chunk_rows, z_width}, input.options()) : Tensor();

  for (chunk.first = 0; chunk.first < columns; chunk.first += step) {
    chunk.count = std::min(step, columns - chunk.first);
    const auto grad_out_chunk = grad_out_rows.narrow(0, chunk.first, chunk.count);
    if (scatter_z) {
      auto z_chunk = z.narrow(0, 0, chunk.count);
      scatter_scope_columns(kernels.local, chunk, z_chunk);
      for (int64_t group = 0; group < g.groups; ++group) {
        add_product(grad_weight_cols[group], group_part(z_chunk, 1, g.groups, group).t(),
                    group_part(grad_out_chunk, 1, g.groups, group));
      }
    }
    if (!need_z_grad) continue;
    auto grad_z_chunk = grad_z.narrow(0, 0, chunk.count);
    for (int64_t group = 0; group < g.groups; ++group) {
      auto grad_z_part = group_part(grad_z_chunk, 1, g.groups, group);
      at::mm_out(grad_z_part, group_part(grad_out_chunk, 1, g.groups, group),
                 group_part(weight_rows, 0, g.groups, group));
    }
    if (need_input) gather_input_grad(kernels.local, chunk, grad_z_chunk, grad_input_cl);
    if (need_kernel_offset || need_data_offset || need_mask) {
      offset_and_mask_grads(kernels.local, chunk, grad_z_chunk, grad_kernel_columns,
                            grad_data_columns, grad_mask_columns);
    }
  }

  const auto dtype = input.scalar_type();  // .to(dtype) is a no-op unless accumulated in float32
  Tensor grad_input =
      need_input ? grad_input_cl.permute({0, 3, 1, 2}).contiguous().to(dtype) : Tensor();
  Tensor grad_weight;
  if (need_weight) {
    grad_weight = grad_weight_cols.transpose(1, 2)
                      .reshape({g.out_channels, g.scope_cells(), -1})
                      .transpose(1, 2)
                      .reshape(weight.sizes())
                      .to(dtype);
  }
  Tensor grad_kernel_offset;
  if (need_kernel_offset) {
    grad_kernel_offset = from_columns(grad_kernel_columns, g);
    if (g.global_kernel_offset) grad_kernel_offset = grad_kernel_offset.sum({2, 3});
  }
  return {result(need_input, grad_input, input), result(need_weight, grad_weight, weight),
          result(need_kernel_offset, grad_kernel_offset, kernel_offset),
          need_data_offset ? from_columns(grad_data_columns, g) : empty(),
          need_mask ? from_columns(grad_mask_columns, g) : empty()};
}

}  // namespace dk_ops
