// CPU kernels of the direct depthwise path (depthwise.h has the math), two of them:
//
// Shared offsets (channels of a kernel offset group > 1, or data offsets / a mask): channels-last
// copies, so that a (location, tap) reads and writes contiguous channels. For each run of
// channels sharing a kernel offset group and a deform group, the scope point and the data point
// are located once, and the channel loops apply their bilinear weights as vector multiply-adds
// over the run. The threads take image rows (n, y_out). The backward's sums do not depend on the
// thread count: the scope gradient is summed per row, then over the rows in order, and the
// input gradient is scattered in phases of rows whose taps read disjoint input rows.
//
// One kernel offset set per channel on a rigid grid: the channels share nothing, and their
// offsets are planes of (H_out, W_out), so the planes stay as they are and the loops run along
// the output rows, each channel on one thread (its input, scope and offset gradients are its
// own: no sums across threads).
#include "depthwise_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include "../depthwise.h"
#include "../sampling.h"
#include "vector_clones.h"

namespace dk_ops {
namespace {

using at::Tensor;

// The four cells a bilinear sample blends, as rows of a channels-last plane, with their weights
// and the weights' derivatives along y and x. Slots for cells outside the plane weigh zero and
// point at rows of zeros (reads) or of scratch (writes), so that the channel loops have no
// branches and no two slots alias.
template <typename T>
struct FourCells {
  const T* value[4];
  T* grad[4];
  T weight[4], d_dy[4], d_dx[4];
};

// The cells of `point` in a plane of rows `plane` (and its gradient `grad_plane`, or null) with
// `channels` values per cell; false where the point samples nothing.
template <typename T>
inline bool four_cells(const BilinearPoint<T>& point, int64_t height, int64_t width,
                       const T* plane, T* grad_plane, int64_t channels, const T* zeros,
                       T* scratch, FourCells<T>& cells) {
  if (!point.inside) return false;
  int k = 0;
  for_each_corner(point, height, width, [&](int64_t y, int64_t x, T w, T wdy, T wdx) {
    const int64_t row = (y * width + x) * channels;
    cells.value[k] = plane + row;
    cells.grad[k] = grad_plane ? grad_plane + row : scratch + k * channels;
    cells.weight[k] = w;
    cells.d_dy[k] = wdy;
    cells.d_dx[k] = wdx;
    ++k;
  });
  for (; k < 4; ++k) {
    cells.value[k] = zeros;
    cells.grad[k] = scratch + k * channels;
    cells.weight[k] = cells.d_dy[k] = cells.d_dx[k] = T(0);
  }
  return true;
}

// The rigid grid's one cell, weight 1, in the same form (slots 1-3 weigh zero).
template <typename T>
inline bool rigid_cell(int64_t y, int64_t x, int64_t height, int64_t width, const T* plane,
                       T* grad_plane, int64_t channels, const T* zeros, T* scratch,
                       FourCells<T>& cells) {
  if (y < 0 || y >= height || x < 0 || x >= width) return false;
  const int64_t row = (y * width + x) * channels;
  cells.value[0] = plane + row;
  cells.grad[0] = grad_plane ? grad_plane + row : scratch;
  cells.weight[0] = T(1);
  cells.d_dy[0] = cells.d_dx[0] = T(0);
  for (int k = 1; k < 4; ++k) {
    cells.value[k] = zeros;
    cells.grad[k] = scratch + k * channels;
    cells.weight[k] = cells.d_dy[k] = cells.d_dx[k] = T(0);
  }
  return true;
}

// A run of channels [begin, end) sharing kernel offset group and deform group; whether it is the
// last run of either.
struct ChannelRun {
  int64_t begin, end, kernel_group, deform_group;
  bool ends_kernel_group, ends_deform_group;
};

std::vector<ChannelRun> channel_runs(const DepthwiseGeometry& d) {
  std::vector<ChannelRun> runs;
  for (int64_t c = 0; c < d.channels;) {
    const int64_t kernel_end = (c / d.kernel_group_channels + 1) * d.kernel_group_channels;
    const int64_t deform_end = (c / d.deform_group_channels + 1) * d.deform_group_channels;
    const int64_t end = std::min(kernel_end, deform_end);
    runs.push_back({c, end, c / d.kernel_group_channels, c / d.deform_group_channels,
                    end == kernel_end, end == deform_end});
    c = end;
  }
  return runs;
}

// Typed pointers of the operands, and per-thread rows of zeros and scratch.
template <typename T>
struct Operands {
  DepthwiseGeometry d;
  std::vector<ChannelRun> runs;
  const T* input;  // (N, H, W, C)
  const T* scope;  // (S, C)
  const T* kernel_offset;
  const T* data_offset;  // null: rigid grid
  const T* mask;         // null: no modulation

  explicit Operands(const DepthwiseOperands& t)
      : d(DepthwiseGeometry::of(t.g)),
        runs(channel_runs(d)),
        input(t.input.data_ptr<T>()),
        scope(t.scope.data_ptr<T>()),
        kernel_offset(t.kernel_offset.data_ptr<T>()),
        data_offset(t.data_offset.defined() ? t.data_offset.data_ptr<T>() : nullptr),
        mask(t.mask.defined() ? t.mask.data_ptr<T>() : nullptr) {}

  int64_t image_size() const { return d.height * d.width * d.channels; }

  T modulation(int64_t n, int64_t dg, int64_t tap, int64_t position) const {
    return mask ? mask[d.mask_index(n, dg, tap, position)] : T(1);
  }
};

// Rows of zeros to read and of scratch to write in place of the cells outside a plane.
template <typename T>
struct Padding {
  std::vector<T> zeros, scratch;
  explicit Padding(int64_t channels) : zeros(channels, T(0)), scratch(4 * channels) {}
};

// The data cells of tap (i, j) for deform group dg at (n, y, x): the rigid pixel or the four
// cells around the data point. grad_image: the input gradient's plane of image n, or null.
template <bool Deformed, typename T>
inline bool data_cells(const Operands<T>& o, int64_t n, int64_t dg, int64_t i, int64_t j,
                       int64_t out_y, int64_t out_x, std::type_identity_t<T>* grad_image,
                       Padding<T>& padding,
                       FourCells<T>& cells) {
  const auto& d = o.d;
  const T* image = o.input + n * o.image_size();
  if constexpr (Deformed) {
    return four_cells(d.template data_point<T>(o.data_offset, n, dg, i, j, out_y, out_x), d.height,
                      d.width, image, grad_image, d.channels, padding.zeros.data(),
                      padding.scratch.data(), cells);
  } else {
    return rigid_cell(d.tap_y(out_y, i), d.tap_x(out_x, j), d.height, d.width, image, grad_image,
                      d.channels, padding.zeros.data(), padding.scratch.data(), cells);
  }
}

template <typename T>
inline bool scope_cells(const Operands<T>& o, int64_t n, int64_t kg, int64_t i, int64_t j,
                        int64_t position, std::type_identity_t<T>* grad_scope, Padding<T>& padding,
                        FourCells<T>& cells) {
  const auto& d = o.d;
  return four_cells(d.template scope_point<T>(o.kernel_offset, n, kg, i, j, position), d.scope_h,
                    d.scope_w, o.scope, grad_scope, d.channels, padding.zeros.data(),
                    padding.scratch.data(), cells);
}

// The sampled input of channel c: one cell on the rigid grid, four with data offsets.
template <bool Deformed, typename T>
inline T sample(const FourCells<T>& cells, int64_t c) {
  if constexpr (Deformed) {
    return cells.weight[0] * cells.value[0][c] + cells.weight[1] * cells.value[1][c] +
           cells.weight[2] * cells.value[2][c] + cells.weight[3] * cells.value[3][c];
  } else {
    return cells.value[0][c];
  }
}

template <typename T>
inline T sample_scope(const FourCells<T>& cells, int64_t c) {
  return cells.weight[0] * cells.value[0][c] + cells.weight[1] * cells.value[1][c] +
         cells.weight[2] * cells.value[2][c] + cells.weight[3] * cells.value[3][c];
}

// ------------------------------------------------------------------ forward

// out (N, H_out, W_out, C): row (n, out_y).
template <bool Deformed, typename T>
DK_VECTOR_CLONES void forward_row(const Operands<T>& o, int64_t n, int64_t out_y, T* out,
                                  Padding<T>& padding) {
  const auto& d = o.d;
  for (int64_t out_x = 0; out_x < d.out_w; ++out_x) {
    const int64_t position = out_y * d.out_w + out_x;
    T* __restrict sums = out + (n * d.positions + position) * d.channels;
    std::fill(sums, sums + d.channels, T(0));
    for (int64_t i = 0; i < d.kernel_h; ++i) {
      for (int64_t j = 0; j < d.kernel_w; ++j) {
        const int64_t tap = i * d.kernel_w + j;
        for (const auto& run : o.runs) {
          FourCells<T> kernel, data;
          if (!scope_cells(o, n, run.kernel_group, i, j, position, nullptr, padding, kernel) ||
              !data_cells<Deformed>(o, n, run.deform_group, i, j, out_y, out_x, nullptr, padding,
                                    data)) {
            continue;
          }
          const T m = o.modulation(n, run.deform_group, tap, position);
#pragma omp simd
          for (int64_t c = run.begin; c < run.end; ++c) {
            sums[c] += m * sample<Deformed>(data, c) * sample_scope(kernel, c);
          }
        }
      }
    }
  }
}

// The operands with the input channels-last (N, H, W, C) and the scope cell-major (S, C).
DepthwiseOperands channels_last(const DepthwiseOperands& t) {
  auto result = t;
  result.input = t.input.permute({0, 2, 3, 1}).contiguous();
  result.scope = t.scope.t().contiguous();
  return result;
}

template <typename T>
void forward_shared(const DepthwiseOperands& t, Tensor& output) {
  const auto operands = channels_last(t);  // alive while o points into it
  const Operands<T> o(operands);
  Tensor out_rows = at::empty({o.d.batch, o.d.out_h, o.d.out_w, o.d.channels}, output.options());
  T* out = out_rows.data_ptr<T>();
  at::parallel_for(0, o.d.batch * o.d.out_h, 1, [&](int64_t begin, int64_t end) {
    Padding<T> padding(o.d.channels);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / o.d.out_h, out_y = row % o.d.out_h;
      if (o.data_offset) {
        forward_row<true>(o, n, out_y, out, padding);
      } else {
        forward_row<false>(o, n, out_y, out, padding);
      }
    }
  });
  output.copy_(out_rows.permute({0, 3, 1, 2}));
}

// ------------------------------------------------------------------ backward

// Where one row's backward writes: each pointer null where that gradient is not wanted.
template <typename T>
struct RowGradients {
  T* input;          // (N, H, W, C)
  T* scope;          // this row's own (S, C) part of the scope gradient
  T* kernel_offset;  // layouts of the operands
  T* data_offset;
  T* mask;
};

// The gradients of row (n, out_y). With u = dL/dout * W(q) and v = dL/dout * m * X(p), per
// channel: dX(p) = m * u, dW(q) = v, so the scope cells get B_k * v and the data cells
// m * A_k * u; the offsets and the mask get the sums over their group's channels
//   dq = sum_k dB_k/dq (v . W_k)    dp = m sum_k dA_k/dp (u . X_k)    dm = sum_k A_k (u . X_k).
template <bool Deformed, typename T>
DK_VECTOR_CLONES void backward_row(const Operands<T>& o, const T* grad_output, int64_t n,
                                   int64_t out_y, const RowGradients<T>& grads,
                                   Padding<T>& padding) {
  const auto& d = o.d;
  T* grad_image = grads.input ? grads.input + n * o.image_size() : nullptr;
  const bool through_scope = grads.scope || grads.kernel_offset;
  const bool through_data = grads.input || grads.data_offset || grads.mask;
  for (int64_t out_x = 0; out_x < d.out_w; ++out_x) {
    const int64_t position = out_y * d.out_w + out_x;
    const T* __restrict go = grad_output + (n * d.positions + position) * d.channels;
    for (int64_t i = 0; i < d.kernel_h; ++i) {
      for (int64_t j = 0; j < d.kernel_w; ++j) {
        const int64_t tap = i * d.kernel_w + j;
        T scope_dy = 0, scope_dx = 0, data_dy = 0, data_dx = 0, data_dm = 0;
        for (const auto& run : o.runs) {
          FourCells<T> kernel, data;
          if (scope_cells(o, n, run.kernel_group, i, j, position, grads.scope, padding, kernel) &&
              data_cells<Deformed>(o, n, run.deform_group, i, j, out_y, out_x, grad_image,
                                   padding, data)) {
            const T m = o.modulation(n, run.deform_group, tap, position);
            if (through_scope) {
              T dot0 = 0, dot1 = 0, dot2 = 0, dot3 = 0;
              T* __restrict g0 = kernel.grad[0];
              T* __restrict g1 = kernel.grad[1];
              T* __restrict g2 = kernel.grad[2];
              T* __restrict g3 = kernel.grad[3];
#pragma omp simd reduction(+ : dot0, dot1, dot2, dot3)
              for (int64_t c = run.begin; c < run.end; ++c) {
                const T v = m * go[c] * sample<Deformed>(data, c);
                g0[c] += kernel.weight[0] * v;
                g1[c] += kernel.weight[1] * v;
                g2[c] += kernel.weight[2] * v;
                g3[c] += kernel.weight[3] * v;
                dot0 += v * kernel.value[0][c];
                dot1 += v * kernel.value[1][c];
                dot2 += v * kernel.value[2][c];
                dot3 += v * kernel.value[3][c];
              }
              const T dots[4] = {dot0, dot1, dot2, dot3};
              for (int k = 0; k < 4; ++k) {
                scope_dy += kernel.d_dy[k] * dots[k];
                scope_dx += kernel.d_dx[k] * dots[k];
              }
            }
            if (through_data) {
              T dot0 = 0, dot1 = 0, dot2 = 0, dot3 = 0;
              T* __restrict g0 = data.grad[0];
              T* __restrict g1 = data.grad[1];
              T* __restrict g2 = data.grad[2];
              T* __restrict g3 = data.grad[3];
              const T a0 = m * data.weight[0], a1 = m * data.weight[1];
              const T a2 = m * data.weight[2], a3 = m * data.weight[3];
#pragma omp simd reduction(+ : dot0, dot1, dot2, dot3)
              for (int64_t c = run.begin; c < run.end; ++c) {
                const T u = go[c] * sample_scope(kernel, c);
                g0[c] += a0 * u;
                dot0 += u * data.value[0][c];
                if constexpr (Deformed) {
                  g1[c] += a1 * u;
                  g2[c] += a2 * u;
                  g3[c] += a3 * u;
                  dot1 += u * data.value[1][c];
                  dot2 += u * data.value[2][c];
                  dot3 += u * data.value[3][c];
                }
              }
              const T dots[4] = {dot0, dot1, dot2, dot3};
              for (int k = 0; k < 4; ++k) {
                data_dm += data.weight[k] * dots[k];
                data_dy += m * data.d_dy[k] * dots[k];
                data_dx += m * data.d_dx[k] * dots[k];
              }
            }
          }
          if (run.ends_kernel_group && grads.kernel_offset) {
            T* out =
                grads.kernel_offset + d.kernel_offset_index(n, run.kernel_group, tap, position);
            out[0] = scope_dy;
            out[d.positions] = scope_dx;
            scope_dy = scope_dx = 0;
          }
          if (run.ends_deform_group) {
            if (grads.data_offset) {
              T* out = grads.data_offset + d.data_offset_index(n, run.deform_group, tap, position);
              out[0] = data_dy;
              out[d.positions] = data_dx;
            }
            if (grads.mask) grads.mask[d.mask_index(n, run.deform_group, tap, position)] = data_dm;
            data_dy = data_dx = data_dm = 0;
          }
        }
      }
    }
  }
}

// Rows of a phase scatter into disjoint input rows: on the rigid grid a row's taps span
// (K_h - 1) * dilation + 1 input rows, so rows `phases` apart never meet; data offsets may send
// a tap anywhere, so each phase is one row of every image.
int64_t input_grad_phases(const DepthwiseGeometry& d, bool deformed) {
  if (deformed) return d.out_h;
  const int64_t span = (d.kernel_h - 1) * d.dilation_h + 1;
  return std::min(d.out_h, (span + d.stride_h - 1) / d.stride_h);
}

template <typename T>
void backward_shared(const DepthwiseOperands& t, const Tensor& grad_output,
                     DepthwiseGradients& planar_grads) {
  const auto operands = channels_last(t);  // alive while o points into it
  const Operands<T> o(operands);
  const Tensor grad_output_rows = grad_output.permute({0, 2, 3, 1}).contiguous();
  DepthwiseGradients grads = planar_grads;
  if (planar_grads.input.defined()) {
    grads.input = at::zeros({o.d.batch, o.d.height, o.d.width, o.d.channels},
                            planar_grads.input.options());
  }
  if (planar_grads.scope.defined()) {
    grads.scope = at::empty({o.d.cells, o.d.channels}, planar_grads.scope.options());
  }
  const auto& d = o.d;
  const int64_t rows = d.batch * d.out_h, scope_size = d.cells * d.channels;
  // Each row's own part of the scope gradient, summed over the rows below.
  std::vector<T> row_scope_grads(grads.scope.defined() ? rows * scope_size : 0, T(0));
  const int64_t phases = grads.input.defined() ? input_grad_phases(d, o.data_offset) : 1;
  const int64_t rows_per_phase = (d.out_h + phases - 1) / phases;
  auto pointer = [](Tensor& grad) { return grad.defined() ? grad.data_ptr<T>() : nullptr; };
  const T* go = grad_output_rows.data_ptr<T>();
  for (int64_t phase = 0; phase < phases; ++phase) {
    at::parallel_for(0, d.batch * rows_per_phase, 1, [&](int64_t begin, int64_t end) {
      Padding<T> padding(d.channels);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / rows_per_phase;
        const int64_t out_y = (item % rows_per_phase) * phases + phase;
        if (out_y >= d.out_h) continue;
        const int64_t row = n * d.out_h + out_y;
        const RowGradients<T> row_grads{
            pointer(grads.input),
            row_scope_grads.empty() ? nullptr : &row_scope_grads[row * scope_size],
            pointer(grads.kernel_offset), pointer(grads.data_offset), pointer(grads.mask)};
        if (o.data_offset) {
          backward_row<true>(o, go, n, out_y, row_grads, padding);
        } else {
          backward_row<false>(o, go, n, out_y, row_grads, padding);
        }
      }
    });
  }
  if (grads.scope.defined()) {
    T* out = grads.scope.data_ptr<T>();
    at::parallel_for(0, scope_size, 1024, [&](int64_t begin, int64_t end) {
      std::fill(out + begin, out + end, T(0));
      for (int64_t row = 0; row < rows; ++row) {
        const T* part = &row_scope_grads[row * scope_size];
        for (int64_t k = begin; k < end; ++k) out[k] += part[k];
      }
    });
    planar_grads.scope.copy_(grads.scope.t());
  }
  if (grads.input.defined()) planar_grads.input.copy_(grads.input.permute({0, 3, 1, 2}));
}

// ------------------------------------------------------------------ one offset set per channel

// A channel's scope with a border of zeros, so that the four cells around any point inside
// (-1, S_h) x (-1, S_w) are in memory and the cells outside the scope read zero: the loops along
// the output rows then need no branches and vectorise (with gathers).
template <typename T>
struct PaddedScope {
  int64_t width;  // S_w + 2
  std::vector<T> cells;

  PaddedScope(const DepthwiseGeometry& d, const T* scope)
      : width(d.scope_w + 2), cells((d.scope_h + 2) * (d.scope_w + 2), T(0)) {
    for (int64_t y = 0; y < d.scope_h; ++y) {
      std::copy(scope + y * d.scope_w, scope + (y + 1) * d.scope_w, &cells[(y + 1) * width + 1]);
    }
  }
};

// Where a tap's scope point falls in the padded scope: the top-left cell, the fractions, and
// whether it samples at all (a point outside, or a non-finite offset, does not: its weights are
// then zero and its cell a valid one).
template <typename T>
struct ScopeSample {
  int top_left;
  T ly, lx, inside;
};

template <typename T>
inline ScopeSample<T> scope_sample(const DepthwiseGeometry& d, int64_t width, T qy, T qx) {
  // & rather than &&: no branches, so that the loops calling this vectorise.
  const bool inside = (qy > T(-1)) & (qy < T(d.scope_h)) & (qx > T(-1)) & (qx < T(d.scope_w));
  const T y = inside ? qy : T(-1), x = inside ? qx : T(-1);
  const T floor_y = std::floor(y), floor_x = std::floor(x);
  return {static_cast<int>(floor_y + 1) * static_cast<int>(width) + static_cast<int>(floor_x + 1),
          y - floor_y, x - floor_x, inside ? T(1) : T(0)};
}

// The bilinear blend of the sample's four cells, top-left, top-right, bottom-left, bottom-right.
template <typename T>
inline T blend(const ScopeSample<T>& s, T p00, T p01, T p10, T p11) {
  return (1 - s.ly) * ((1 - s.lx) * p00 + s.lx * p01) + s.ly * ((1 - s.lx) * p10 + s.lx * p11);
}

// The output columns [begin, end) whose tap at column offset j * dilation reads inside the image.
inline std::pair<int64_t, int64_t> reading_columns(const DepthwiseGeometry& d, int64_t j) {
  const int64_t shift = d.pad_w - j * d.dilation_w;  // out_x * stride - shift is the input column
  const int64_t begin = shift > 0 ? (shift + d.stride_w - 1) / d.stride_w : 0;
  const int64_t end = d.width - 1 + shift >= 0 ? (d.width - 1 + shift) / d.stride_w + 1 : 0;
  return {std::min(begin, d.out_w), std::clamp<int64_t>(end, begin, d.out_w)};
}

template <typename T>
DK_VECTOR_CLONES void forward_channel(const DepthwiseGeometry& d, const T* input,
                                      const T* scope, const T* kernel_offset, T* output,
                                      int64_t c) {
  const PaddedScope<T> padded(d, scope + c * d.cells);
  const T* __restrict p = padded.cells.data();
  const int pw = static_cast<int>(padded.width);
  for (int64_t n = 0; n < d.batch; ++n) {
    const T* image = input + (n * d.channels + c) * d.height * d.width;
    T* __restrict out = output + (n * d.channels + c) * d.positions;
    std::fill(out, out + d.positions, T(0));
    for (int64_t i = 0; i < d.kernel_h; ++i) {
      for (int64_t j = 0; j < d.kernel_w; ++j) {
        const T* dy = kernel_offset + d.kernel_offset_index(n, c, i * d.kernel_w + j, 0);
        const T* dx = dy + d.positions;
        const T origin_y = T(d.origin_h + i), origin_x = T(d.origin_w + j);
        const auto [begin, end] = reading_columns(d, j);
        for (int64_t out_y = 0; out_y < d.out_h; ++out_y) {
          const int64_t y = d.tap_y(out_y, i);
          if (y < 0 || y >= d.height) continue;
          const T* __restrict row = image + y * d.width + d.tap_x(0, j);
          const int64_t first = out_y * d.out_w;
#pragma omp simd
          for (int64_t out_x = begin; out_x < end; ++out_x) {
            const auto s = scope_sample(d, pw, origin_y + dy[first + out_x],
                                        origin_x + dx[first + out_x]);
            const T w = s.inside * blend(s, p[s.top_left], p[s.top_left + 1], p[s.top_left + pw],
                                         p[s.top_left + pw + 1]);
            out[first + out_x] += row[out_x * d.stride_w] * w;
          }
        }
      }
    }
  }
}

// The gradients of channel c; grad_scope_cells and the row buffers are the thread's own.
template <typename T>
DK_VECTOR_CLONES void backward_channel(const DepthwiseGeometry& d, const T* input,
                                       const T* scope, const T* kernel_offset,
                                       const T* grad_output, T* grad_input, T* grad_scope,
                                       T* grad_kernel_offset, int64_t c) {
  const PaddedScope<T> padded(d, scope + c * d.cells);
  const T* __restrict p = padded.cells.data();
  const int pw = static_cast<int>(padded.width);
  std::vector<T> grad_cells(padded.cells.size(), T(0));
  // Per output column of a row, from a loop without branches that vectorises: the sample's cell,
  // weights and dL/dW(q), for the scatter into grad_cells (a loop of its own: AVX2 has no vector
  // scatter), its input gradient and its offset gradients.
  std::vector<int> row_cell(d.out_w);
  std::vector<T> row_ly(d.out_w), row_lx(d.out_w), row_grad(d.out_w), row_input_grad(d.out_w);
  std::vector<T> row_grad_dy(d.out_w), row_grad_dx(d.out_w);
  for (int64_t n = 0; n < d.batch; ++n) {
    const int64_t plane = (n * d.channels + c) * d.height * d.width;
    const T* image = input + plane;
    T* grad_image = grad_input ? grad_input + plane : nullptr;
    const T* __restrict go = grad_output + (n * d.channels + c) * d.positions;
    for (int64_t i = 0; i < d.kernel_h; ++i) {
      for (int64_t j = 0; j < d.kernel_w; ++j) {
        const int64_t offset_index = d.kernel_offset_index(n, c, i * d.kernel_w + j, 0);
        const T* dy = kernel_offset + offset_index;
        const T* dx = dy + d.positions;
        T* grad_dy = grad_kernel_offset ? grad_kernel_offset + offset_index : nullptr;
        T* grad_dx = grad_dy ? grad_dy + d.positions : nullptr;
        const T origin_y = T(d.origin_h + i), origin_x = T(d.origin_w + j);
        const auto [begin, end] = reading_columns(d, j);
        for (int64_t out_y = 0; out_y < d.out_h; ++out_y) {
          const int64_t y = d.tap_y(out_y, i);
          const int64_t first = out_y * d.out_w;
          const bool row_inside = y >= 0 && y < d.height;
          if (grad_dy) {  // the taps that read outside the image get no gradient
            const int64_t zero_end = row_inside ? begin : d.out_w;
            std::fill(grad_dy + first, grad_dy + first + zero_end, T(0));
            std::fill(grad_dx + first, grad_dx + first + zero_end, T(0));
            if (row_inside) {
              std::fill(grad_dy + first + end, grad_dy + first + d.out_w, T(0));
              std::fill(grad_dx + first + end, grad_dx + first + d.out_w, T(0));
            }
          }
          if (!row_inside) continue;
          const T* __restrict row = image + y * d.width + d.tap_x(0, j);
#pragma omp simd
          for (int64_t out_x = begin; out_x < end; ++out_x) {
            const auto s = scope_sample(d, pw, origin_y + dy[first + out_x],
                                        origin_x + dx[first + out_x]);
            const T p00 = p[s.top_left], p01 = p[s.top_left + 1];
            const T p10 = p[s.top_left + pw], p11 = p[s.top_left + pw + 1];
            const T g = go[first + out_x] * s.inside;
            const T v = g * row[out_x * d.stride_w];  // dL/dW(q)
            row_cell[out_x] = s.top_left;
            row_ly[out_x] = s.ly;
            row_lx[out_x] = s.lx;
            row_grad[out_x] = v;
            row_input_grad[out_x] = g * blend(s, p00, p01, p10, p11);
            row_grad_dy[out_x] = v * ((1 - s.lx) * (p10 - p00) + s.lx * (p11 - p01));
            row_grad_dx[out_x] = v * ((1 - s.ly) * (p01 - p00) + s.ly * (p11 - p10));
          }
          if (grad_image) {
            T* grad_row = grad_image + y * d.width + d.tap_x(0, j);
            for (int64_t out_x = begin; out_x < end; ++out_x) {
              grad_row[out_x * d.stride_w] += row_input_grad[out_x];
            }
          }
          if (grad_dy) {
            std::copy(&row_grad_dy[begin], &row_grad_dy[end], grad_dy + first + begin);
            std::copy(&row_grad_dx[begin], &row_grad_dx[end], grad_dx + first + begin);
          }
          if (grad_scope) {
            for (int64_t out_x = begin; out_x < end; ++out_x) {
              const T ly = row_ly[out_x], lx = row_lx[out_x], v = row_grad[out_x];
              T* cell = &grad_cells[row_cell[out_x]];
              cell[0] += (1 - ly) * (1 - lx) * v;
              cell[1] += (1 - ly) * lx * v;
              cell[pw] += ly * (1 - lx) * v;
              cell[pw + 1] += ly * lx * v;
            }
          }
        }
      }
    }
  }
  if (grad_scope) {
    for (int64_t y = 0; y < d.scope_h; ++y) {
      for (int64_t x = 0; x < d.scope_w; ++x) {
        grad_scope[c * d.cells + y * d.scope_w + x] = grad_cells[(y + 1) * pw + x + 1];
      }
    }
  }
}

template <typename T>
void forward_per_channel(const DepthwiseOperands& t, Tensor& output) {
  const auto d = DepthwiseGeometry::of(t.g);
  at::parallel_for(0, d.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      forward_channel(d, t.input.data_ptr<T>(), t.scope.data_ptr<T>(),
                      t.kernel_offset.data_ptr<T>(), output.data_ptr<T>(), c);
    }
  });
}

template <typename T>
void backward_per_channel(const DepthwiseOperands& t, const Tensor& grad_output,
                          DepthwiseGradients& grads) {
  const auto d = DepthwiseGeometry::of(t.g);
  auto pointer = [](Tensor& grad) { return grad.defined() ? grad.data_ptr<T>() : nullptr; };
  at::parallel_for(0, d.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      backward_channel(d, t.input.data_ptr<T>(), t.scope.data_ptr<T>(),
                       t.kernel_offset.data_ptr<T>(), grad_output.data_ptr<T>(),
                       pointer(grads.input), pointer(grads.scope), pointer(grads.kernel_offset),
                       c);
    }
  });
}

// One kernel offset set per channel on a rigid grid: the per-channel kernels.
bool per_channel(const DepthwiseOperands& t) {
  return t.g.kernel_offset_groups == t.g.in_channels && !t.data_offset.defined() &&
         !t.mask.defined();
}

}  // namespace

void depthwise_forward_cpu(const DepthwiseOperands& t, Tensor& output) {
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "dk_ops_depthwise_forward", [&] {
    if (per_channel(t)) {
      forward_per_channel<scalar_t>(t, output);
    } else {
      forward_shared<scalar_t>(t, output);
    }
  });
}

void depthwise_backward_cpu(const DepthwiseOperands& t, const Tensor& grad_output,
                            DepthwiseGradients& grads) {
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "dk_ops_depthwise_backward", [&] {
    if (per_channel(t)) {
      backward_per_channel<scalar_t>(t, grad_output, grads);
    } else {
      backward_shared<scalar_t>(t, grad_output, grads);
    }
  });
}

}  // namespace dk_ops
