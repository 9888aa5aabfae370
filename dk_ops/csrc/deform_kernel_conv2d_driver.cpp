// The device-independent part of deform_kernel_conv2d: layouts, chunking and GEMMs of the
// local path around the per-device column kernels, and the global-offset fast path.
//
// Local path, per chunk of columns (see deform_kernel_conv2d.h), per group:
//   forward   out[cols]  = Z @ W'^T          W' = weight as (C_out, S*C_in/g)
//   backward  grad W'^T += Z^T @ gO[cols]    (BLAS runs it faster than gO^T @ Z: see below)
//             grad Z     = gO[cols] @ W'     -> input / offset / mask gradients
// with the output and its gradient as channels-last rows (N*L, C_out): BLAS runs these
// shapes faster than their transposes when C_out is small (2-3x at C_out = 32).
// Global path (kernel_offset (N, 2*Gk*taps), no data offset, no mask): the kernel of every
// image is A_n @ scope, with A the bilinear sampling matrix of its offsets, the batch runs as
// one grouped convolution, and the GEMMs of the filters and their gradients take the whole
// batch at once: a number of ATen calls that does not grow with the batch.
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <algorithm>
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

bool is_reduced_precision(const Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}
// The dtype sums are kept in: float32 for half / bfloat16, which reach the code below only on
// CUDA (the CPU computes them in float32 throughout).
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

// Bilinear sampling of global kernel offsets: the matrices A, (N, Gk, taps, S), kernel =
// A @ scope; and, for the offsets' gradient, the scope cells of each sample's four corners with
// the derivatives of the corners' weights along the offsets' y and x. In float32 for half /
// bfloat16 offsets, as the local path's kernels compute coordinates and weights.
struct GlobalSampling {
  Tensor weight;      // A, (N, Gk, taps, S)
  Tensor cell;        // (N, Gk, taps, 4), long; 0 at the corners that sample nothing
  Tensor derivative;  // (N, Gk, taps, 2, 4): along y, then along x; 0 where nothing is sampled
};

GlobalSampling global_sampling(const DeformKernelGeometry& g, const Tensor& kernel_offset) {
  const auto offset = kernel_offset.to(sum_dtype(kernel_offset))
                          .reshape({g.batch, g.kernel_offset_groups, g.taps(), 2});
  const auto options = offset.options();
  const auto tap = at::arange(g.taps(), options.dtype(at::kLong));
  const auto y = offset.select(3, 0) + (at::div(tap, g.kernel_w, "floor").to(options.dtype()) +
                                        g.scope_origin_h());
  const auto x = offset.select(3, 1) + (at::remainder(tap, g.kernel_w).to(options.dtype()) +
                                        g.scope_origin_w());
  // Same rule as sampling.h: outside (-1, S) (or NaN / inf) samples nothing.
  const auto inside = (y > -1) & (y < g.scope_h) & (x > -1) & (x < g.scope_w);
  // Along one axis, (N, Gk, taps, 2): the cells floor(c) and floor(c) + 1, weighing 1 - l and
  // l with l = c - floor(c), so their slopes are -1 and +1.
  const auto step = at::arange(2, options), slope = 2 * step - 1;
  struct Axis {
    Tensor cell, weight, valid;
  };
  auto axis = [&](const Tensor& coordinate, int64_t size) {
    const auto low = at::floor(coordinate).unsqueeze(-1), cell = low + step;
    return Axis{cell, (1 - step) + slope * (coordinate.unsqueeze(-1) - low),
                (cell >= 0) & (cell < size)};
  };
  const auto along_y = axis(y, g.scope_h), along_x = axis(x, g.scope_w);
  // The four corners: terms along y as rows against terms along x as columns, (..., 2, 2),
  // flattened to (..., 4).
  auto rows = [](const Tensor& t) { return t.unsqueeze(-1); };
  auto columns = [](const Tensor& t) { return t.unsqueeze(-2); };
  const auto valid =
      (rows(along_y.valid) & columns(along_x.valid) & rows(rows(inside))).flatten(-2);
  auto where_valid = [&](const Tensor& corners) {
    return at::where(valid, corners.flatten(-2), 0);
  };
  GlobalSampling a;
  a.cell = where_valid(rows(along_y.cell) * g.scope_w + columns(along_x.cell)).to(at::kLong);
  a.weight =
      at::zeros({g.batch, g.kernel_offset_groups, g.taps(), g.scope_cells()}, options)
          .scatter_add_(-1, a.cell, where_valid(rows(along_y.weight) * columns(along_x.weight)));
  a.derivative = at::stack({where_valid(rows(slope) * columns(along_x.weight)),
                            where_valid(rows(along_y.weight) * slope)},
                           -2);
  return a;
}

// Scope channels that share one conv group and one kernel offset group, and so one sampling
// matrix: output channels [out_begin, +out_size) x channels [in_begin, +in_size) of weight
// dim 1. With groups = kernel_offset_groups = 1 it is the whole scope.
struct ScopeBlock {
  int64_t out_begin, out_size, in_begin, in_size, kernel_group;
};

std::vector<ScopeBlock> scope_blocks(const DeformKernelGeometry& g) {
  const int64_t per_group = g.in_channels / g.groups, out_per_group = g.out_channels / g.groups;
  const int64_t per_kernel_group = g.in_channels / g.kernel_offset_groups;
  std::vector<ScopeBlock> blocks;
  for (int64_t group = 0; group < g.groups; ++group) {
    for (int64_t c = group * per_group; c < (group + 1) * per_group;) {
      const int64_t kernel_group = c / per_kernel_group;
      const int64_t next = std::min((group + 1) * per_group, (kernel_group + 1) * per_kernel_group);
      blocks.push_back({group * out_per_group, out_per_group, c - group * per_group, next - c,
                        kernel_group});
      c = next;
    }
  }
  return blocks;
}

// (C_out, C_in/groups, X) tensor -> the block's (out_size * in_size, X) rows; a view when
// the block is whole output-channel rows.
Tensor block_rows(const Tensor& t, const ScopeBlock& block) {
  return t.narrow(0, block.out_begin, block.out_size)
      .narrow(1, block.in_begin, block.in_size)
      .reshape({block.out_size * block.in_size, t.size(2)});
}

// One kernel per image: (N * C_out, C_in/groups, K_h, K_w) filters for the batched conv.
// Per block, one GEMM for the whole batch: scope rows (R, S) @ [A_0^T ... A_N-1^T] (S, N * taps),
// then a copy into image-major order. (Per image, the (R, S) @ (S, taps) GEMMs ran at a
// fraction of memory speed: 8.6 ms against 4.7 ms for this with c5's 512 x 512 scope, batch 2.)
Tensor global_filters(const DeformKernelGeometry& g, const Tensor& weight,
                      const GlobalSampling& sampling) {
  const auto scope = weight.reshape({g.out_channels, g.in_channels / g.groups, g.scope_cells()});
  auto filters = at::empty({g.batch, g.out_channels, g.in_channels / g.groups, g.taps()},
                           weight.options());
  for (const auto& block : scope_blocks(g)) {
    const auto samplings = sampling.weight.select(1, block.kernel_group)  // (N, taps, S)
                               .reshape({g.batch * g.taps(), g.scope_cells()})
                               .to(weight.scalar_type());
    const auto kernels = at::mm(block_rows(scope, block), samplings.t())  // (R, N * taps)
                             .view({block.out_size, block.in_size, g.batch, g.taps()});
    filters.narrow(1, block.out_begin, block.out_size)
        .narrow(2, block.in_begin, block.in_size)
        .copy_(kernels.permute({2, 0, 1, 3}));
  }
  return filters.view({g.batch * g.out_channels, g.in_channels / g.groups, g.kernel_h,
                       g.kernel_w});
}

// The batch as one image of N * C channels.
Tensor batch_as_channels(const Tensor& t) {
  return t.reshape({1, t.size(0) * t.size(1), t.size(2), t.size(3)});
}

Tensor global_forward(const DeformKernelGeometry& g, const Tensor& input, const Tensor& weight,
                      const Tensor& kernel_offset, const OptionalTensor& bias) {
  const auto filters = global_filters(g, weight, global_sampling(g, kernel_offset));
  const OptionalTensor batch_bias = bias ? OptionalTensor(bias->repeat({g.batch})) : std::nullopt;
  return at::convolution(batch_as_channels(input), filters, batch_bias, {g.stride_h, g.stride_w},
                         {g.pad_h, g.pad_w}, {g.dilation_h, g.dilation_w}, false, {0, 0},
                         g.batch * g.groups)
      .view({g.batch, g.out_channels, g.out_h, g.out_w});
}

// Gradients of (input, weight, kernel_offset); undefined where not needed.
std::array<Tensor, 3> global_backward(const DeformKernelGeometry& g, const Tensor& grad_output,
                                      const Tensor& input, const Tensor& weight,
                                      const Tensor& kernel_offset, std::array<bool, 3> needed) {
  const auto sampling = global_sampling(g, kernel_offset);
  const bool need_filters = needed[1] || needed[2];
  auto [grad_batch_input, grad_filters, unused_grad_bias] = at::convolution_backward(
      batch_as_channels(grad_output), batch_as_channels(input), global_filters(g, weight, sampling),
      std::nullopt, {g.stride_h, g.stride_w}, {g.pad_h, g.pad_w}, {g.dilation_h, g.dilation_w},
      false, {0, 0}, g.batch * g.groups, {needed[0], need_filters, false});
  std::array<Tensor, 3> grads;
  if (needed[0]) grads[0] = grad_batch_input.view_as(input);
  if (!need_filters) return grads;
  // Per block, one GEMM for the whole batch each, with gK = [gK_0 ... gK_N-1] (R, N * taps) the
  // block's kernel gradients and A = [A_0; ...; A_N-1] (N * taps, S) its sampling matrices:
  //   grad scope rows = gK @ A            (the sum over images inside the GEMM)
  //   grad A          = gK^T @ scope rows (summed over the blocks of a kernel offset group)
  // In sum_dtype, like the sampling matrices: half / bfloat16 operands are converted to float32
  // (at::mm's out_dtype overload is CUDA-only and newer than torch 2.4). gK is converted by the
  // copy that puts it in this order; the GEMMs have a small side (N * taps or S), so they run at
  // memory speed, and float32 costs wider reads, not slower arithmetic.
  const auto sums = sampling.weight.options();
  const int64_t in_per_group = g.in_channels / g.groups;
  auto grad_kernels = at::empty({g.out_channels, in_per_group, g.batch, g.taps()}, sums);
  grad_kernels.copy_(grad_filters.reshape({g.batch, g.out_channels, in_per_group, g.taps()})
                         .permute({1, 2, 0, 3}));
  grad_kernels = grad_kernels.view({g.out_channels, in_per_group, -1});  // (.., N * taps)
  const auto scope = weight.to(sums.dtype()).reshape({g.out_channels, in_per_group, -1});
  // The blocks tile the weight, so each writes its own part of grad_scope.
  Tensor grad_scope = needed[1] ? at::empty_like(scope) : Tensor();
  Tensor grad_sampling = needed[2] ? at::zeros_like(sampling.weight) : Tensor();
  for (const auto& block : scope_blocks(g)) {
    const auto grad_rows = block_rows(grad_kernels, block);  // (R, N * taps)
    if (needed[1]) {
      const auto samplings = sampling.weight.select(1, block.kernel_group)  // (N, taps, S)
                                 .reshape({g.batch * g.taps(), g.scope_cells()});
      auto grad_block = grad_scope.narrow(0, block.out_begin, block.out_size)
                            .narrow(1, block.in_begin, block.in_size);
      if (grad_block.is_contiguous()) {  // whole output channels: always with one block
        auto grad_block_rows = grad_block.view({-1, g.scope_cells()});
        at::mm_out(grad_block_rows, grad_rows, samplings);
      } else {
        grad_block.copy_(at::mm(grad_rows, samplings).view(grad_block.sizes()));
      }
    }
    if (needed[2]) {
      grad_sampling.select(1, block.kernel_group)
          .add_(at::mm(grad_rows.t(), block_rows(scope, block))
                    .view({g.batch, g.taps(), g.scope_cells()}));
    }
  }
  if (needed[1]) grads[1] = grad_scope.view(weight.sizes()).to(weight.scalar_type());
  if (needed[2]) {
    // d loss / d offset = sum over the four corners of d loss / d A[cell] * d A[cell] / d offset.
    grads[2] = (grad_sampling.gather(-1, sampling.cell).unsqueeze(-2) * sampling.derivative)
                   .sum(-1)
                   .reshape(kernel_offset.sizes())
                   .to(kernel_offset.scalar_type());
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
    const ColumnKernels& kernels, const Tensor& input, const Tensor& weight,
    const Tensor& kernel_offset, const OptionalTensor& data_offset, const OptionalTensor& mask,
    const OptionalTensor& bias, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    int64_t kernel_offset_groups, int64_t deform_groups) {
  const auto g = check_deform_kernel_conv2d_args(input, weight, kernel_offset, data_offset, mask,
                                                 bias, kernel_size, stride, padding, dilation,
                                                 groups, kernel_offset_groups, deform_groups);
  if (is_reduced_precision(input) && input.is_cpu()) {  // bfloat16 / half on CPU: in float32
    return deform_kernel_conv2d_forward(kernels, input.to(at::kFloat), weight.to(at::kFloat),
                                        kernel_offset.to(at::kFloat), to_float(data_offset),
                                        to_float(mask), to_float(bias), kernel_size, stride,
                                        padding, dilation, groups, kernel_offset_groups,
                                        deform_groups)
        .to(input.scalar_type());
  }
  if (g.batch == 0) return at::empty({0, g.out_channels, g.out_h, g.out_w}, input.options());
  if (uses_global_path(g, data_offset, mask)) {
    return global_forward(g, input.contiguous(), weight.contiguous(), kernel_offset.contiguous(),
                          contiguous(bias));
  }
  auto chunk = whole_batch(g, input, kernel_offset, data_offset, mask);
  const auto weight_rows = weight_cells_last(g, weight);
  const int64_t columns = g.batch * g.positions(), step = columns_per_chunk(g, input);
  auto out_rows = at::empty({columns, g.out_channels}, input.options());
  auto z = at::empty({std::min(step, columns), g.scope_cells() * g.in_channels}, input.options());
  for (chunk.first = 0; chunk.first < columns; chunk.first += step) {
    chunk.count = std::min(step, columns - chunk.first);
    auto z_chunk = z.narrow(0, 0, chunk.count);
    scatter_scope_columns(kernels, chunk, z_chunk);
    const auto out_chunk = out_rows.narrow(0, chunk.first, chunk.count);
    for (int64_t group = 0; group < g.groups; ++group) {
      auto out_part = group_part(out_chunk, 1, g.groups, group);
      at::mm_out(out_part, group_part(z_chunk, 1, g.groups, group),
                 group_part(weight_rows, 0, g.groups, group).t());
    }
  }
  auto output = from_rows(out_rows, g);
  if (bias) output.add_(bias->view({1, -1, 1, 1}));
  return output;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> deform_kernel_conv2d_backward(
    const ColumnKernels& kernels, const Tensor& grad_output, const Tensor& input,
    const Tensor& weight, const Tensor& kernel_offset, const OptionalTensor& data_offset,
    const OptionalTensor& mask, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    int64_t kernel_offset_groups, int64_t deform_groups, std::array<bool, 5> output_mask) {
  const auto g = check_deform_kernel_conv2d_backward_args(
      grad_output, input, weight, kernel_offset, data_offset, mask, kernel_size, stride, padding,
      dilation, groups, kernel_offset_groups, deform_groups);
  if (is_reduced_precision(input) && input.is_cpu()) {  // bfloat16 / half on CPU: in float32
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
    auto grads = global_backward(g, grad_output.contiguous(), input.contiguous(),
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
  auto z = at::empty({std::min(step, columns), z_width}, input.options());
  auto grad_z = need_z_grad ? at::empty_like(z) : Tensor();

  for (chunk.first = 0; chunk.first < columns; chunk.first += step) {
    chunk.count = std::min(step, columns - chunk.first);
    const auto grad_out_chunk = grad_out_rows.narrow(0, chunk.first, chunk.count);
    if (need_weight) {
      auto z_chunk = z.narrow(0, 0, chunk.count);
      scatter_scope_columns(kernels, chunk, z_chunk);
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
    if (need_input) gather_input_grad(kernels, chunk, grad_z_chunk, grad_input_cl);
    if (need_kernel_offset || need_data_offset || need_mask) {
      offset_and_mask_grads(kernels, chunk, grad_z_chunk, grad_kernel_columns, grad_data_columns,
                            grad_mask_columns);
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
