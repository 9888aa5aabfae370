// CPU kernels of deform_kernel_conv2d.
//
// The scope weights enter the output linearly, so for each image chunk
//   out[o, col] = sum_{(c, s)} weight[o, c, s] * Z[(c, s), col]        (one GEMM per group)
// with the "scope columns" Z[(c, s), col] = sum_taps B_s(q) * m * X(p): every sampled input
// value is spread over the (at most 4) scope cells its tap samples. No per-location kernel
// is ever built. The bilinear corners of every (offset group, tap, column) are computed once
// per chunk into tables (shared by all channels of the group), so the channel loops only
// gather, multiply and add.
//
// Backward: grad_weight = gO @ Z^T and grad_Z = W^T @ gO (GEMMs), then grad_input is the
// transposed scatter (parallel over channels, each thread owns its input planes) and the
// offset/mask gradients a reduction over channels (parallel over columns). No atomics:
// results are deterministic.
//
// Global kernel offsets without data offsets take a fast path: one kernel per image is
// resampled from the scope, then a grouped convolution runs over the whole batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "../deform_kernel_conv2d.h"
#include "../sampling.h"

namespace dk_ops {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

constexpr int kCorners = 4;  // bilinear corners per sample
constexpr int64_t kColumnGrain = 1024;

// Per-location tensor (N, C, H_out, W_out) of images [n0, n0+B) as (C, B*L) columns.
Tensor to_columns(const Tensor& t, int64_t n0, int64_t chunk) {
  return t.narrow(0, n0, chunk).transpose(0, 1).reshape({t.size(1), -1}).contiguous();
}

// Inverse of to_columns: writes (C, B*L) columns into images [n0, n0+B) of `dst`.
void from_columns(const Tensor& columns, Tensor& dst, int64_t n0, int64_t chunk) {
  dst.narrow(0, n0, chunk)
      .copy_(columns.view({dst.size(1), chunk, dst.size(2), dst.size(3)}).transpose(0, 1));
}

// Bilinear corners of each (group, tap, column) sample: flat offset of the corner cell
// (-1 when the corner does not exist) and its weight and weight derivatives.
// Layout: [(group * taps + tap) * corners + corner][column].
template <typename T>
struct CornerTable {
  Tensor offsets_storage, weights_storage;
  int64_t* offsets;
  T* weight;  // w
  T* d_dy;    // dw / dy (only filled when derivatives were asked for)
  T* d_dx;    // dw / dx
  int64_t stride;  // entries per corner row (= columns)

  CornerTable(int64_t rows, int64_t columns, bool with_derivatives, const at::TensorOptions& opts)
      : stride(columns) {
    offsets_storage = at::full({rows, columns}, -1, opts.dtype(at::kLong));
    weights_storage = at::empty({with_derivatives ? 3 : 1, rows, columns}, opts);
    offsets = offsets_storage.data_ptr<int64_t>();
    weight = weights_storage.data_ptr<T>();
    d_dy = with_derivatives ? weight + rows * columns : nullptr;
    d_dx = with_derivatives ? weight + 2 * rows * columns : nullptr;
  }

  // Stores the corners of `point` (cells inside the plane only) at row `row`, column `col`;
  // `cell_offset(y, x)` maps a cell to the flat offset the kernels will add.
  template <typename CellOffset>
  void fill(int64_t row, int64_t col, const BilinearPoint<T>& point, int64_t height,
            int64_t width, CellOffset&& cell_offset) {
    int slot = 0;
    for_each_corner(point, height, width, [&](int64_t y, int64_t x, T w, T wdy, T wdx) {
      const int64_t e = (row * kCorners + slot++) * stride + col;
      offsets[e] = cell_offset(y, x);
      weight[e] = w;
      if (d_dy) {
        d_dy[e] = wdy;
        d_dx[e] = wdx;
      }
    });
  }
};

// Everything the channel loops of one image chunk need, in column layout.
template <typename T>
struct Chunk {
  const DeformKernelGeometry& g;
  int64_t images, columns;  // B and B * L
  const T* input;           // (B, C_in, H, W) of the chunk
  Tensor kernel_columns;    // (2*Gk*taps, B*L) kernel offsets
  Tensor data_columns;      // (2*Gd*taps, B*L) data offsets, or undefined (rigid data grid)
  Tensor mask_columns;      // (Gd*taps, B*L), or undefined

  bool deformed() const { return data_columns.defined(); }
  const T* mask_row(int64_t group, int64_t tap) const {
    return mask_columns.defined()
               ? mask_columns.data_ptr<T>() + (group * g.taps() + tap) * columns
               : nullptr;
  }
};

// Kernel-scope corners for each (kernel offset group, tap, column); offsets are s * columns
// so that `Z_c + offset + col` is the scope-column entry.
template <typename T>
CornerTable<T> kernel_corners(const Chunk<T>& chunk, bool with_derivatives) {
  const auto& g = chunk.g;
  const int64_t rows = g.kernel_offset_groups * g.taps();
  CornerTable<T> table(rows * kCorners, chunk.columns, with_derivatives,
                       chunk.kernel_columns.options());
  const T* offset = chunk.kernel_columns.template data_ptr<T>();
  const T origin_h = g.scope_origin_h(), origin_w = g.scope_origin_w();
  const int64_t columns = chunk.columns;
  at::parallel_for(0, rows, 1, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t tap = row % g.taps();
      const T tap_h = origin_h + tap / g.kernel_w, tap_w = origin_w + tap % g.kernel_w;
      const T* dy = offset + 2 * row * columns;
      const T* dx = dy + columns;
      for (int64_t col = 0; col < columns; ++col) {
        const auto point = locate<T>(tap_h + dy[col], tap_w + dx[col], g.scope_h, g.scope_w);
        table.fill(row, col, point, g.scope_h, g.scope_w,
                   [&](int64_t y, int64_t x) { return (y * g.scope_w + x) * columns; });
      }
    }
  });
  return table;
}

// Input corners for each (deform group, tap, column): offsets index the chunk input from
// channel 0 (b * C_in * H * W + y * W + x). Without data offsets the grid is rigid and a
// single "corner" of weight 1 per sample is stored (deform group 0 only).
template <typename T>
CornerTable<T> data_corners(const Chunk<T>& chunk, bool with_derivatives) {
  const auto& g = chunk.g;
  const int64_t groups = chunk.deformed() ? g.deform_groups : 1;
  const int64_t rows = groups * g.taps();
  const int corners = chunk.deformed() ? kCorners : 1;
  CornerTable<T> table(rows * corners, chunk.columns, with_derivatives && chunk.deformed(),
                       chunk.kernel_columns.options());
  const T* offset = chunk.deformed() ? chunk.data_columns.template data_ptr<T>() : nullptr;
  const int64_t plane = g.height * g.width, positions = g.positions();
  at::parallel_for(0, rows, 1, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t tap = row % g.taps();
      const int64_t tap_h = (tap / g.kernel_w) * g.dilation_h - g.pad_h;
      const int64_t tap_w = (tap % g.kernel_w) * g.dilation_w - g.pad_w;
      for (int64_t col = 0; col < chunk.columns; ++col) {
        const int64_t image = col / positions, position = col % positions;
        const int64_t y = (position / g.out_w) * g.stride_h + tap_h;
        const int64_t x = (position % g.out_w) * g.stride_w + tap_w;
        const int64_t image_start = image * g.in_channels * plane;
        if (offset == nullptr) {
          if (y >= 0 && y < g.height && x >= 0 && x < g.width) {
            table.offsets[row * chunk.columns + col] = image_start + y * g.width + x;
            table.weight[row * chunk.columns + col] = 1;
          }
          continue;
        }
        const T* dy = offset + 2 * row * chunk.columns;
        const T* dx = dy + chunk.columns;
        const auto point = locate<T>(y + dy[col], x + dx[col], g.height, g.width);
        table.fill(row, col, point, g.height, g.width,
                   [&](int64_t cy, int64_t cx) { return image_start + cy * g.width + cx; });
      }
    }
  });
  return table;
}

// m * X(p) for channel c (input plane base `x`) at one column: the data sample of a tap.
template <typename T, int Corners>
inline T sample_input(const CornerTable<T>& data, int64_t row, int64_t col, const T* x) {
  T value = 0;
  for (int k = 0; k < Corners; ++k) {
    const int64_t e = (row * Corners + k) * data.stride + col;
    const int64_t offset = data.offsets[e];
    if (offset >= 0) value += (Corners == 1 ? x[offset] : data.weight[e] * x[offset]);
  }
  return value;
}

// Z[(c, s), col] += B_s(q) * m * X(p) over all taps; parallel over channels (each thread
// owns its channels' rows of Z).
template <typename T, int DataCorners>
void scatter_scope_columns(const Chunk<T>& chunk, const CornerTable<T>& kernel,
                           const CornerTable<T>& data, T* columns_out) {
  const auto& g = chunk.g;
  const int64_t columns = chunk.columns, plane = g.height * g.width;
  const int64_t per_kernel_group = g.in_channels / g.kernel_offset_groups;
  const int64_t per_deform_group = g.in_channels / g.deform_groups;
  at::parallel_for(0, g.in_channels, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t kg = c / per_kernel_group, dg = c / per_deform_group;
      const int64_t data_group = chunk.deformed() ? dg : 0;
      const T* x = chunk.input + c * plane;
      T* z = columns_out + c * g.scope_cells() * columns;
      for (int64_t tap = 0; tap < g.taps(); ++tap) {
        const int64_t kernel_row = kg * g.taps() + tap, data_row = data_group * g.taps() + tap;
        const T* m = chunk.mask_row(dg, tap);
        for (int64_t col = 0; col < columns; ++col) {
          T value = sample_input<T, DataCorners>(data, data_row, col, x);
          if (m) value *= m[col];
          if (value == T(0)) continue;
          for (int k = 0; k < kCorners; ++k) {
            const int64_t e = (kernel_row * kCorners + k) * columns + col;
            const int64_t offset = kernel.offsets[e];
            if (offset >= 0) z[offset + col] += kernel.weight[e] * value;
          }
        }
      }
    }
  });
}

// grad_input += transposed scatter of grad_Z; parallel over channels (each thread owns the
// input planes of its channels).
template <typename T, int DataCorners>
void gather_input_grad(const Chunk<T>& chunk, const CornerTable<T>& kernel,
                       const CornerTable<T>& data, const T* grad_columns, T* grad_input) {
  const auto& g = chunk.g;
  const int64_t columns = chunk.columns, plane = g.height * g.width;
  const int64_t per_kernel_group = g.in_channels / g.kernel_offset_groups;
  const int64_t per_deform_group = g.in_channels / g.deform_groups;
  at::parallel_for(0, g.in_channels, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t kg = c / per_kernel_group, dg = c / per_deform_group;
      const int64_t data_group = chunk.deformed() ? dg : 0;
      const T* gz = grad_columns + c * g.scope_cells() * columns;
      T* gx = grad_input + c * plane;
      for (int64_t tap = 0; tap < g.taps(); ++tap) {
        const int64_t kernel_row = kg * g.taps() + tap, data_row = data_group * g.taps() + tap;
        const T* m = chunk.mask_row(dg, tap);
        for (int64_t col = 0; col < columns; ++col) {
          T grad = 0;  // d loss / d (m * X(p)) for this tap
          for (int k = 0; k < kCorners; ++k) {
            const int64_t e = (kernel_row * kCorners + k) * columns + col;
            const int64_t offset = kernel.offsets[e];
            if (offset >= 0) grad += kernel.weight[e] * gz[offset + col];
          }
          if (m) grad *= m[col];
          if (grad == T(0)) continue;
          for (int k = 0; k < DataCorners; ++k) {
            const int64_t e = (data_row * DataCorners + k) * columns + col;
            const int64_t offset = data.offsets[e];
            if (offset >= 0) gx[offset] += (DataCorners == 1 ? grad : data.weight[e] * grad);
          }
        }
      }
    }
  });
}

// Gradients of kernel offsets, data offsets and mask, in column layout. Each is a sum over
// the channels of its group, so the work is split by columns (each thread owns its columns).
template <typename T, int DataCorners>
void offset_and_mask_grads(const Chunk<T>& chunk, const CornerTable<T>& kernel,
                           const CornerTable<T>& data, const T* grad_columns,
                           T* grad_kernel_offset, T* grad_data_offset, T* grad_mask) {
  const auto& g = chunk.g;
  const int64_t columns = chunk.columns, plane = g.height * g.width;
  const int64_t per_kernel_group = g.in_channels / g.kernel_offset_groups;
  const int64_t per_deform_group = g.in_channels / g.deform_groups;
  at::parallel_for(0, columns, kColumnGrain, [&](int64_t col_begin, int64_t col_end) {
    for (int64_t c = 0; c < g.in_channels; ++c) {
      const int64_t kg = c / per_kernel_group, dg = c / per_deform_group;
      const int64_t data_group = chunk.deformed() ? dg : 0;
      const T* x = chunk.input + c * plane;
      const T* gz = grad_columns + c * g.scope_cells() * columns;
      for (int64_t tap = 0; tap < g.taps(); ++tap) {
        const int64_t kernel_row = kg * g.taps() + tap, data_row = data_group * g.taps() + tap;
        const int64_t deform_row = dg * g.taps() + tap;
        const T* m = chunk.mask_row(dg, tap);
        for (int64_t col = col_begin; col < col_end; ++col) {
          T sample = 0, sample_dy = 0, sample_dx = 0;  // X(p) and its derivatives
          for (int k = 0; k < DataCorners; ++k) {
            const int64_t e = (data_row * DataCorners + k) * columns + col;
            const int64_t offset = data.offsets[e];
            if (offset < 0) continue;
            const T value = x[offset];
            if (DataCorners == 1) {
              sample += value;
            } else {
              sample += data.weight[e] * value;
              if (grad_data_offset) {
                sample_dy += data.d_dy[e] * value;
                sample_dx += data.d_dx[e] * value;
              }
            }
          }
          T grad = 0, grad_qy = 0, grad_qx = 0;  // sum_s B_s(q) gZ_s and its q-derivatives
          for (int k = 0; k < kCorners; ++k) {
            const int64_t e = (kernel_row * kCorners + k) * columns + col;
            const int64_t offset = kernel.offsets[e];
            if (offset < 0) continue;
            const T value = gz[offset + col];
            grad += kernel.weight[e] * value;
            if (grad_kernel_offset) {
              grad_qy += kernel.d_dy[e] * value;
              grad_qx += kernel.d_dx[e] * value;
            }
          }
          const T modulation = m ? m[col] : T(1);
          if (grad_kernel_offset) {
            T* out = grad_kernel_offset + 2 * kernel_row * columns + col;
            out[0] += modulation * sample * grad_qy;
            out[columns] += modulation * sample * grad_qx;
          }
          if (grad_mask) grad_mask[deform_row * columns + col] += grad * sample;
          if (grad_data_offset) {
            T* out = grad_data_offset + 2 * deform_row * columns + col;
            out[0] += grad * modulation * sample_dy;
            out[columns] += grad * modulation * sample_dx;
          }
        }
      }
    }
  });
}

template <typename Fn>
void with_data_corners(bool deformed, Fn&& fn) {
  if (deformed) {
    fn(std::integral_constant<int, kCorners>{});
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

int64_t images_per_chunk(const DeformKernelGeometry& g, int64_t element_size) {
  const int64_t per_image =
      std::max<int64_t>(1, g.in_channels * g.scope_cells() * g.positions() * element_size);
  return std::clamp<int64_t>(max_column_bytes() / per_image, 1, std::max<int64_t>(g.batch, 1));
}

template <typename T>
Chunk<T> make_chunk(const DeformKernelGeometry& g, const Tensor& input,
                    const Tensor& kernel_offset, const OptionalTensor& data_offset,
                    const OptionalTensor& mask, int64_t n0, int64_t images) {
  Chunk<T> chunk{g, images, images * g.positions(),
                 input.data_ptr<T>() + n0 * g.in_channels * g.height * g.width,
                 to_columns(kernel_offset, n0, images), Tensor(), Tensor()};
  if (data_offset) chunk.data_columns = to_columns(*data_offset, n0, images);
  if (mask) chunk.mask_columns = to_columns(*mask, n0, images);
  return chunk;
}

// weight viewed as (C_out, C_in/groups * S) and column buffers as (C_in * S, columns):
// the rows of group `group`.
Tensor group_rows(const Tensor& t, int64_t groups, int64_t group) {
  const int64_t rows = t.size(0) / groups;
  return t.narrow(0, group * rows, rows);
}

// ---------------------------------------------------------------------- global kernel offsets

// One kernel per image: kernels[n, o, c, i, j] = B(weight[o, c], q(n, group of c, tap)).
template <typename T>
void sample_global_kernels(const DeformKernelGeometry& g, const T* weight, const T* offset,
                           T* kernels) {
  const int64_t in_per_group = g.in_channels / g.groups, out_per_group = g.out_channels / g.groups;
  const int64_t per_kernel_group = g.in_channels / g.kernel_offset_groups;
  at::parallel_for(0, g.batch * g.out_channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / g.out_channels, o = item % g.out_channels;
      for (int64_t ci = 0; ci < in_per_group; ++ci) {
        const int64_t kg = ((o / out_per_group) * in_per_group + ci) / per_kernel_group;
        const T* scope = weight + (o * in_per_group + ci) * g.scope_cells();
        T* kernel = kernels + (item * in_per_group + ci) * g.taps();
        for (int64_t tap = 0; tap < g.taps(); ++tap) {
          const T* q = offset + n * 2 * g.kernel_offset_groups * g.taps() + 2 * (kg * g.taps() + tap);
          const auto point = locate<T>(g.scope_origin_h() + tap / g.kernel_w + q[0],
                                       g.scope_origin_w() + tap % g.kernel_w + q[1], g.scope_h,
                                       g.scope_w);
          T value = 0;
          for_each_corner(point, g.scope_h, g.scope_w, [&](int64_t y, int64_t x, T w, T, T) {
            value += w * scope[y * g.scope_w + x];
          });
          kernel[tap] = value;
        }
      }
    }
  });
}

// Backward of sample_global_kernels: grad_weight (parallel over output channels) and
// grad_offset (parallel over images).
template <typename T>
void sample_global_kernels_backward(const DeformKernelGeometry& g, const T* weight,
                                    const T* offset, const T* grad_kernels, T* grad_weight,
                                    T* grad_offset) {
  const int64_t in_per_group = g.in_channels / g.groups, out_per_group = g.out_channels / g.groups;
  const int64_t per_kernel_group = g.in_channels / g.kernel_offset_groups;
  const int64_t offsets_per_image = 2 * g.kernel_offset_groups * g.taps();
  // Calls visit(n, o, ci, tap, point, grad of the sampled tap, offset entry) for every tap.
  auto for_each_tap = [&](int64_t n, int64_t o, auto&& visit) {
    for (int64_t ci = 0; ci < in_per_group; ++ci) {
      const int64_t kg = ((o / out_per_group) * in_per_group + ci) / per_kernel_group;
      for (int64_t tap = 0; tap < g.taps(); ++tap) {
        const int64_t entry = n * offsets_per_image + 2 * (kg * g.taps() + tap);
        const auto point = locate<T>(g.scope_origin_h() + tap / g.kernel_w + offset[entry],
                                     g.scope_origin_w() + tap % g.kernel_w + offset[entry + 1],
                                     g.scope_h, g.scope_w);
        const T grad = grad_kernels[((n * g.out_channels + o) * in_per_group + ci) * g.taps() + tap];
        visit(ci, point, grad, entry);
      }
    }
  };
  if (grad_weight) {
    at::parallel_for(0, g.out_channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        for (int64_t n = 0; n < g.batch; ++n) {
          for_each_tap(n, o, [&](int64_t ci, const BilinearPoint<T>& point, T grad, int64_t) {
            T* scope = grad_weight + (o * in_per_group + ci) * g.scope_cells();
            for_each_corner(point, g.scope_h, g.scope_w, [&](int64_t y, int64_t x, T w, T, T) {
              scope[y * g.scope_w + x] += w * grad;
            });
          });
        }
      }
    });
  }
  if (grad_offset) {
    at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t o = 0; o < g.out_channels; ++o) {
          for_each_tap(n, o, [&](int64_t ci, const BilinearPoint<T>& point, T grad, int64_t entry) {
            const T* scope = weight + (o * in_per_group + ci) * g.scope_cells();
            for_each_corner(point, g.scope_h, g.scope_w,
                            [&](int64_t y, int64_t x, T, T wdy, T wdx) {
                              grad_offset[entry] += wdy * scope[y * g.scope_w + x] * grad;
                              grad_offset[entry + 1] += wdx * scope[y * g.scope_w + x] * grad;
                            });
          });
        }
      }
    });
  }
}

Tensor global_kernels(const DeformKernelGeometry& g, const Tensor& weight,
                      const Tensor& kernel_offset) {
  auto kernels = at::empty({g.batch, g.out_channels, g.in_channels / g.groups, g.kernel_h,
                            g.kernel_w}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "dk_ops_sample_global_kernels", [&] {
    sample_global_kernels<scalar_t>(g, weight.data_ptr<scalar_t>(),
                                    kernel_offset.data_ptr<scalar_t>(), kernels.data_ptr<scalar_t>());
  });
  return kernels;
}

// The batch as one image with N * C_in channels; kernels as N * C_out filters in N * groups groups.
Tensor batch_as_channels(const Tensor& t) {
  return t.reshape({1, t.size(0) * t.size(1), t.size(2), t.size(3)});
}
Tensor kernels_as_filters(const Tensor& kernels) {
  return kernels.reshape({kernels.size(0) * kernels.size(1), kernels.size(2), kernels.size(3),
                          kernels.size(4)});
}

Tensor global_forward(const DeformKernelGeometry& g, const Tensor& input, const Tensor& weight,
                      const Tensor& kernel_offset, const OptionalTensor& bias) {
  const auto kernels = global_kernels(g, weight, kernel_offset);
  const OptionalTensor batch_bias = bias ? OptionalTensor(bias->repeat({g.batch})) : std::nullopt;
  auto out = at::convolution(batch_as_channels(input), kernels_as_filters(kernels), batch_bias,
                             {g.stride_h, g.stride_w}, {g.pad_h, g.pad_w},
                             {g.dilation_h, g.dilation_w}, false, {0, 0}, g.batch * g.groups);
  return out.view({g.batch, g.out_channels, g.out_h, g.out_w});
}

std::array<Tensor, 3> global_backward(const DeformKernelGeometry& g, const Tensor& grad_output,
                                      const Tensor& input, const Tensor& weight,
                                      const Tensor& kernel_offset, std::array<bool, 3> needed) {
  const auto kernels = global_kernels(g, weight, kernel_offset);
  const bool need_kernels = needed[1] || needed[2];
  auto [grad_batch_input, grad_filters, unused_bias] = at::convolution_backward(
      batch_as_channels(grad_output), batch_as_channels(input), kernels_as_filters(kernels),
      std::nullopt, {g.stride_h, g.stride_w}, {g.pad_h, g.pad_w}, {g.dilation_h, g.dilation_w},
      false, {0, 0}, g.batch * g.groups, {needed[0], need_kernels, false});
  Tensor grad_input = needed[0] ? grad_batch_input.view_as(input) : Tensor();
  Tensor grad_weight = needed[1] ? at::zeros_like(weight) : Tensor();
  Tensor grad_offset = needed[2] ? at::zeros_like(kernel_offset) : Tensor();
  if (need_kernels) {
    const auto grad_kernels = grad_filters.contiguous();
    AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "dk_ops_sample_global_kernels_backward", [&] {
      sample_global_kernels_backward<scalar_t>(
          g, weight.data_ptr<scalar_t>(), kernel_offset.data_ptr<scalar_t>(),
          grad_kernels.data_ptr<scalar_t>(),
          needed[1] ? grad_weight.data_ptr<scalar_t>() : nullptr,
          needed[2] ? grad_offset.data_ptr<scalar_t>() : nullptr);
    });
  }
  return {grad_input, grad_weight, grad_offset};
}

// ---------------------------------------------------------------------- entry points

bool uses_global_path(const DeformKernelGeometry& g, const OptionalTensor& data_offset,
                      const OptionalTensor& mask) {
  return g.global_kernel_offset && !data_offset && !mask;
}

// Global kernel offsets combined with data offsets or a mask take the general path with
// the offsets broadcast to every location.
Tensor local_kernel_offset(const DeformKernelGeometry& g, const Tensor& kernel_offset) {
  if (!g.global_kernel_offset) return kernel_offset.contiguous();
  return kernel_offset.view({g.batch, -1, 1, 1}).expand({-1, -1, g.out_h, g.out_w}).contiguous();
}

OptionalTensor contiguous(const OptionalTensor& t) {
  return t ? OptionalTensor(t->contiguous()) : std::nullopt;
}

bool is_reduced_precision(const Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}
OptionalTensor to_float(const OptionalTensor& t) {
  return t ? OptionalTensor(t->to(at::kFloat)) : std::nullopt;
}

Tensor forward_cpu(const Tensor& input_, const Tensor& weight_, const Tensor& kernel_offset_,
                   const OptionalTensor& data_offset_, const OptionalTensor& mask_,
                   const OptionalTensor& bias_, at::IntArrayRef kernel_size,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                   int64_t groups, int64_t kernel_offset_groups, int64_t deform_groups) {
  const auto g = check_deform_kernel_conv2d_args(input_, weight_, kernel_offset_, data_offset_,
                                                 mask_, bias_, kernel_size, stride, padding,
                                                 dilation, groups, kernel_offset_groups,
                                                 deform_groups);
  if (is_reduced_precision(input_)) {  // bfloat16 / half: compute in float32
    return forward_cpu(input_.to(at::kFloat), weight_.to(at::kFloat),
                       kernel_offset_.to(at::kFloat), to_float(data_offset_), to_float(mask_),
                       to_float(bias_), kernel_size, stride, padding, dilation, groups,
                       kernel_offset_groups, deform_groups)
        .to(input_.scalar_type());
  }
  auto output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input_.options());
  if (g.batch == 0) return output;
  const auto input = input_.contiguous();
  const auto weight = weight_.contiguous();
  if (uses_global_path(g, data_offset_, mask_)) {
    return global_forward(g, input, weight, kernel_offset_.contiguous(), contiguous(bias_));
  }
  const auto kernel_offset = local_kernel_offset(g, kernel_offset_);
  const auto data_offset = contiguous(data_offset_), mask = contiguous(mask_);
  const auto weight_rows = weight.view({g.out_channels, -1});
  const int64_t chunk_size = images_per_chunk(g, input.element_size());

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dk_ops_deform_kernel_conv2d_cpu", [&] {
    for (int64_t n0 = 0; n0 < g.batch; n0 += chunk_size) {
      const int64_t images = std::min(chunk_size, g.batch - n0);
      const auto chunk = make_chunk<scalar_t>(g, input, kernel_offset, data_offset, mask, n0, images);
      auto columns = at::zeros({g.in_channels * g.scope_cells(), chunk.columns}, input.options());
      const auto kernel = kernel_corners(chunk, false);
      const auto data = data_corners(chunk, false);
      with_data_corners(chunk.deformed(), [&](auto corners) {
        scatter_scope_columns<scalar_t, decltype(corners)::value>(chunk, kernel, data,
                                                                  columns.data_ptr<scalar_t>());
      });
      auto out_columns = at::empty({g.out_channels, chunk.columns}, input.options());
      for (int64_t group = 0; group < g.groups; ++group) {
        auto out_rows = group_rows(out_columns, g.groups, group);
        at::mm_out(out_rows, group_rows(weight_rows, g.groups, group),
                   group_rows(columns, g.groups, group));
      }
      from_columns(out_columns, output, n0, images);
    }
  });
  if (bias_) output.add_(bias_->view({1, -1, 1, 1}));
  return output;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_cpu(
    const Tensor& grad_output_, const Tensor& input_, const Tensor& weight_,
    const Tensor& kernel_offset_, const OptionalTensor& data_offset_,
    const OptionalTensor& mask_, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    int64_t kernel_offset_groups, int64_t deform_groups, std::array<bool, 5> output_mask) {
  const auto g = check_deform_kernel_conv2d_backward_args(
      grad_output_, input_, weight_, kernel_offset_, data_offset_, mask_, kernel_size, stride,
      padding, dilation, groups, kernel_offset_groups, deform_groups);
  if (is_reduced_precision(input_)) {  // bfloat16 / half: compute in float32
    auto grads = backward_cpu(grad_output_.to(at::kFloat), input_.to(at::kFloat),
                              weight_.to(at::kFloat), kernel_offset_.to(at::kFloat),
                              to_float(data_offset_), to_float(mask_), kernel_size, stride,
                              padding, dilation, groups, kernel_offset_groups, deform_groups,
                              output_mask);
    const auto dtype = input_.scalar_type();
    return {std::get<0>(grads).to(dtype), std::get<1>(grads).to(dtype),
            std::get<2>(grads).to(dtype), std::get<3>(grads).to(dtype),
            std::get<4>(grads).to(dtype)};
  }
  const bool need_input = output_mask[0], need_weight = output_mask[1];
  const bool need_kernel_offset = output_mask[2];
  const bool need_data_offset = output_mask[3] && data_offset_.has_value();
  const bool need_mask = output_mask[4] && mask_.has_value();
  const auto empty = at::empty({0}, input_.options());
  auto zeros_or_empty = [&](bool needed, const Tensor& like) {
    return needed ? at::zeros_like(like, at::MemoryFormat::Contiguous) : empty;
  };
  auto grad_input = zeros_or_empty(need_input, input_);
  auto grad_weight = zeros_or_empty(need_weight, weight_);
  auto grad_kernel_offset = zeros_or_empty(need_kernel_offset, kernel_offset_);
  auto grad_data_offset = need_data_offset ? zeros_or_empty(true, *data_offset_) : empty;
  auto grad_mask = need_mask ? zeros_or_empty(true, *mask_) : empty;
  if (g.batch == 0) {
    return {grad_input, grad_weight, grad_kernel_offset, grad_data_offset, grad_mask};
  }
  const auto input = input_.contiguous();
  const auto weight = weight_.contiguous();
  const auto grad_output = grad_output_.contiguous();
  if (uses_global_path(g, data_offset_, mask_)) {
    auto grads = global_backward(g, grad_output, input, weight, kernel_offset_.contiguous(),
                                 {need_input, need_weight, need_kernel_offset});
    return {need_input ? grads[0] : empty, need_weight ? grads[1] : empty,
            need_kernel_offset ? grads[2] : empty, empty, empty};
  }
  const auto kernel_offset = local_kernel_offset(g, kernel_offset_);
  const auto data_offset = contiguous(data_offset_), mask = contiguous(mask_);
  const auto weight_rows = weight.view({g.out_channels, -1});
  auto grad_weight_rows = need_weight ? grad_weight.view({g.out_channels, -1}) : empty;
  // Local-layout gradient of the kernel offsets (a global one is summed over locations).
  auto grad_local_kernel_offset =
      need_kernel_offset && g.global_kernel_offset ? at::zeros_like(kernel_offset) : grad_kernel_offset;
  const bool need_columns_grad = need_input || need_kernel_offset || need_data_offset || need_mask;
  const int64_t chunk_size = images_per_chunk(g, input.element_size());

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dk_ops_deform_kernel_conv2d_backward_cpu", [&] {
    for (int64_t n0 = 0; n0 < g.batch; n0 += chunk_size) {
      const int64_t images = std::min(chunk_size, g.batch - n0);
      const auto chunk = make_chunk<scalar_t>(g, input, kernel_offset, data_offset, mask, n0, images);
      const auto grad_out_columns = to_columns(grad_output, n0, images);
      const auto kernel = kernel_corners(chunk, need_kernel_offset);
      const auto data = data_corners(chunk, need_data_offset);
      with_data_corners(chunk.deformed(), [&](auto corners) {
        constexpr int kDataCorners = decltype(corners)::value;
        if (need_weight) {
          auto columns = at::zeros({g.in_channels * g.scope_cells(), chunk.columns}, input.options());
          scatter_scope_columns<scalar_t, kDataCorners>(chunk, kernel, data,
                                                        columns.data_ptr<scalar_t>());
          for (int64_t group = 0; group < g.groups; ++group) {
            group_rows(grad_weight_rows, g.groups, group)
                .addmm_(group_rows(grad_out_columns, g.groups, group),
                        group_rows(columns, g.groups, group).t());
          }
        }
        if (!need_columns_grad) return;
        auto grad_columns = at::empty({g.in_channels * g.scope_cells(), chunk.columns}, input.options());
        for (int64_t group = 0; group < g.groups; ++group) {
          auto rows = group_rows(grad_columns, g.groups, group);
          at::mm_out(rows, group_rows(weight_rows, g.groups, group).t(),
                     group_rows(grad_out_columns, g.groups, group));
        }
        const scalar_t* gz = grad_columns.data_ptr<scalar_t>();
        if (need_input) {
          scalar_t* gx = grad_input.data_ptr<scalar_t>() + n0 * g.in_channels * g.height * g.width;
          gather_input_grad<scalar_t, kDataCorners>(chunk, kernel, data, gz, gx);
        }
        if (need_kernel_offset || need_data_offset || need_mask) {
          auto ko = need_kernel_offset ? at::zeros_like(chunk.kernel_columns) : empty;
          auto dof = need_data_offset ? at::zeros_like(chunk.data_columns) : empty;
          auto mk = need_mask ? at::zeros_like(chunk.mask_columns) : empty;
          offset_and_mask_grads<scalar_t, kDataCorners>(
              chunk, kernel, data, gz, need_kernel_offset ? ko.data_ptr<scalar_t>() : nullptr,
              need_data_offset ? dof.data_ptr<scalar_t>() : nullptr,
              need_mask ? mk.data_ptr<scalar_t>() : nullptr);
          if (need_kernel_offset) from_columns(ko, grad_local_kernel_offset, n0, images);
          if (need_data_offset) from_columns(dof, grad_data_offset, n0, images);
          if (need_mask) from_columns(mk, grad_mask, n0, images);
        }
      });
    }
  });
  if (need_kernel_offset && g.global_kernel_offset) {
    grad_kernel_offset = grad_local_kernel_offset.sum({2, 3});
  }
  return {grad_input, grad_weight, grad_kernel_offset, grad_data_offset, grad_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(dk_ops, CPU, m) {
  m.impl("deform_kernel_conv2d", &forward_cpu);
  m.impl("deform_kernel_conv2d_backward", &backward_cpu);
}

}  // namespace dk_ops
