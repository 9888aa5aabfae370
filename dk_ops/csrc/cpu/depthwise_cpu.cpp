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
// offsets are planes of (H_out, W_out), so the planes stay as they are, each channel on one
// thread (its input, scope and offset gradients are its own: no sums across threads). Per tap,
// the input pixels it reads are copied into output order, so that one loop runs over the whole
// plane, and each point is sampled from the few scope cells around the tap (ScopeWindow) with
// no gathers.
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

// The per-channel kernels' loops over the output positions sample a different scope point in
// every lane. GCC if-converts (and so vectorises) their float compares and selects only without
// trapping math; these kernels never read the floating-point exception flags, so that is safe.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

// An input plane with a border of zeros wide enough for every tap of every output: a tap's
// column (tap_column) then reads whole rows, and a tap that reads outside the image reads zero,
// which also zeroes its gradients.
template <typename T>
struct PaddedPlane {
  int64_t width;
  std::vector<T> cells;

  explicit PaddedPlane(const DepthwiseGeometry& d)
      : width(std::max(d.width + d.pad_w, (d.out_w - 1) * d.stride_w +
                                              (d.kernel_w - 1) * d.dilation_w + 1)),
        cells(std::max(d.height + d.pad_h, (d.out_h - 1) * d.stride_h +
                                               (d.kernel_h - 1) * d.dilation_h + 1) *
                  width,
              T(0)) {}

  // Where input pixel (y, x) sits.
  int64_t index(const DepthwiseGeometry& d, int64_t y, int64_t x) const {
    return (y + d.pad_h) * width + x + d.pad_w;
  }
  void copy_in(const DepthwiseGeometry& d, const T* plane) {
    for (int64_t y = 0; y < d.height; ++y) {
      std::copy(plane + y * d.width, plane + (y + 1) * d.width, &cells[index(d, y, 0)]);
    }
  }
  void copy_out(const DepthwiseGeometry& d, T* plane) const {
    for (int64_t y = 0; y < d.height; ++y) {
      std::copy_n(&cells[index(d, y, 0)], d.width, plane + y * d.width);
    }
  }
  // Where tap (i, j) of output (out_y, 0) reads; output column x reads x * stride_w further.
  int64_t tap_row(const DepthwiseGeometry& d, int64_t i, int64_t j, int64_t out_y) const {
    return (out_y * d.stride_h + i * d.dilation_h) * width + j * d.dilation_w;
  }
  // What tap (i, j) reads at every output position, in output order (one tap's im2col): the
  // loops over the positions then read it contiguously, and run as one loop over the whole
  // plane rather than one per output row, each with a scalar tail.
  void tap_column(const DepthwiseGeometry& d, int64_t i, int64_t j, T* column) const {
    for (int64_t out_y = 0; out_y < d.out_h; ++out_y) {
      const T* row = &cells[tap_row(d, i, j, out_y)];
      T* out = column + out_y * d.out_w;
      for (int64_t out_x = 0; out_x < d.out_w; ++out_x) out[out_x] = row[out_x * d.stride_w];
    }
  }
  // The reverse: adds every output position's value to the pixel that tap (i, j) reads there.
  void add_tap_column(const DepthwiseGeometry& d, int64_t i, int64_t j, const T* column) {
    for (int64_t out_y = 0; out_y < d.out_h; ++out_y) {
      T* row = &cells[tap_row(d, i, j, out_y)];
      const T* in = column + out_y * d.out_w;
      for (int64_t out_x = 0; out_x < d.out_w; ++out_x) row[out_x * d.stride_w] += in[out_x];
    }
  }
};

// The 4 x 4 scope cells around a tap's rigid scope point. A point whose four cells lie among
// them (its offset within about 1.5 cells of the rigid point, where trained offsets mostly
// stay) is sampled from them as the sum of tent-weighted cells,
//   W(q) = sum_a t(q_y - a) sum_b t(q_x - b) cell[a][b],   t(d) = max(0, 1 - |d|),
// which is the bilinear blend: no gathers, so the loops vectorise on any x86-64-v3 CPU. The
// other points (and non-finite ones) are sampled exactly in a scalar pass.
template <typename T>
struct ScopeWindow {
  static constexpr int kSize = 4;
  int64_t first_y, first_x;  // scope coordinates of the window's top-left cell
  T rigid_y, rigid_x;        // window coordinates of the tap's rigid scope point
  T low_y, high_y, low_x, high_x;  // the scope, (-1, S) in window coordinates
  T cells[kSize * kSize];          // zero outside the scope

  ScopeWindow(const DepthwiseGeometry& d, const T* scope, int64_t i, int64_t j)
      : first_y(static_cast<int64_t>(std::floor(d.origin_h + i)) - 1),
        first_x(static_cast<int64_t>(std::floor(d.origin_w + j)) - 1),
        rigid_y(T(d.origin_h + i - first_y)),
        rigid_x(T(d.origin_w + j - first_x)),
        low_y(T(-1 - first_y)),
        high_y(T(d.scope_h - first_y)),
        low_x(T(-1 - first_x)),
        high_x(T(d.scope_w - first_x)) {
    for (int a = 0; a < kSize; ++a) {
      for (int b = 0; b < kSize; ++b) {
        const int64_t y = first_y + a, x = first_x + b;
        const bool in_scope = y >= 0 && y < d.scope_h && x >= 0 && x < d.scope_w;
        cells[a * kSize + b] = in_scope ? scope[y * d.scope_w + x] : T(0);
      }
    }
  }

  // 1 where the point (window coordinates) has its four cells in the window, else 0 (NaN too).
  static T holds(T y, T x) {
    return T((y >= T(0)) & (y < T(kSize - 1)) & (x >= T(0)) & (x < T(kSize - 1)));
  }
  // 1 inside the scope's (-1, S) x (-1, S), where the sample has a gradient.
  T inside(T y, T x) const {
    return T((y > low_y) & (y < high_y) & (x > low_x) & (x < high_x));
  }
};

// The tent weight t(e) = max(0, 1 - |e|) of a cell at distance e, zero unless `held`. (No
// std::abs: a function defined before the pragma above is not inlined into these loops, and a
// call keeps them from vectorising.)
template <typename T>
inline T tent(T e, T held) {
  const T t = 1 - (e < T(0) ? -e : e);
  return (held > 0) & (t > 0) ? t : T(0);
}

// The slope of a held point's blend along one axis, where `sums` are the window's rows (or
// columns) blended along the other axis: sums[f + 1] - sums[f] for the point's top-left window
// cell f. (A point on a cell edge takes the cell below or to its right as its top-left one, as
// the bilinear rule does.)
template <typename T>
inline T window_slope(T r, const T (&sums)[4]) {
  const T d0 = sums[1] - sums[0], d1 = sums[2] - sums[1], d2 = sums[3] - sums[2];
  return r >= T(2) ? d2 : (r >= T(1) ? d1 : d0);
}

// The tap's scope point (q_y, q_x), located by the bilinear rule all kernels share
// (sampling.h), for the points the window does not hold.
template <typename T>
inline BilinearPoint<T> exact_scope_point(const DepthwiseGeometry& d, int64_t i, int64_t j, T dy,
                                          T dx) {
  return locate<T>(T(d.origin_h + i) + dy, T(d.origin_w + j) + dx, d.scope_h, d.scope_w);
}

template <typename T>
DK_WIDE_VECTOR_CLONES void forward_channel(const DepthwiseGeometry& d, const T* input,
                                           const T* scope, const T* kernel_offset, T* output,
                                           int64_t c) {
  constexpr int kSize = ScopeWindow<T>::kSize;
  const T* channel_scope = scope + c * d.cells;
  PaddedPlane<T> image(d);
  const int64_t positions = d.positions;  // a local: the stores to out cannot change it
  std::vector<T> tap_values(positions);
  const T* __restrict column = tap_values.data();
  for (int64_t n = 0; n < d.batch; ++n) {
    image.copy_in(d, input + (n * d.channels + c) * d.height * d.width);
    T* __restrict out = output + (n * d.channels + c) * d.positions;
    std::fill(out, out + d.positions, T(0));
    for (int64_t i = 0; i < d.kernel_h; ++i) {
      for (int64_t j = 0; j < d.kernel_w; ++j) {
        image.tap_column(d, i, j, tap_values.data());
        const ScopeWindow<T> window(d, channel_scope, i, j);
        const T* __restrict dy = kernel_offset + d.kernel_offset_index(n, c, i * d.kernel_w + j, 0);
        const T* __restrict dx = dy + d.positions;
        T misses = 0;
#pragma omp simd reduction(+ : misses)
        for (int64_t k = 0; k < positions; ++k) {
          const T ry = window.rigid_y + dy[k], rx = window.rigid_x + dx[k];
          const T held = ScopeWindow<T>::holds(ry, rx);
          T ty[kSize], tx[kSize];
#pragma GCC unroll 4
          for (int a = 0; a < kSize; ++a) {
            ty[a] = tent(ry - T(a), held);
            tx[a] = tent(rx - T(a), held);
          }
          T w = 0;
#pragma GCC unroll 4
          for (int a = 0; a < kSize; ++a) {
            T row = 0;
#pragma GCC unroll 4
            for (int b = 0; b < kSize; ++b) row += tx[b] * window.cells[a * kSize + b];
            w += ty[a] * row;
          }
          out[k] += column[k] * w;
          misses += 1 - held;
        }
        if (misses == 0) continue;
        for (int64_t k = 0; k < positions; ++k) {
          const T ry = window.rigid_y + dy[k], rx = window.rigid_x + dx[k];
          if (ScopeWindow<T>::holds(ry, rx) > 0) continue;
          T w = 0;
          for_each_corner(exact_scope_point(d, i, j, dy[k], dx[k]), d.scope_h, d.scope_w,
                          [&](int64_t y, int64_t x, T weight, T, T) {
                            w += weight * channel_scope[y * d.scope_w + x];
                          });
          out[k] += column[k] * w;
        }
      }
    }
  }
}

// The gradients of channel c; the position buffers are the thread's own.
template <typename T>
DK_WIDE_VECTOR_CLONES void backward_channel(const DepthwiseGeometry& d, const T* input,
                                            const T* scope, const T* kernel_offset,
                                            const T* grad_output, T* grad_input, T* grad_scope,
                                            T* grad_kernel_offset, int64_t c) {
  constexpr int kSize = ScopeWindow<T>::kSize;
  const T* channel_scope = scope + c * d.cells;
  // The scope gradient: the windows' sums, and the exact samples' scatter.
  std::vector<T> scope_grad(d.cells, T(0));
  PaddedPlane<T> image(d), grad_image(d);
  const int64_t positions = d.positions;
  // Per output position: what the tap reads and the input gradient of that pixel.
  std::vector<T> buffers(4 * positions);
  T* __restrict column = buffers.data();
  T* __restrict input_grads = column + positions;
  T* __restrict unused_offset_grads = input_grads + positions;  // 2 planes: where unwanted go
  for (int64_t n = 0; n < d.batch; ++n) {
    const int64_t plane = (n * d.channels + c) * d.height * d.width;
    image.copy_in(d, input + plane);
    std::fill(grad_image.cells.begin(), grad_image.cells.end(), T(0));
    const T* __restrict go = grad_output + (n * d.channels + c) * positions;
    for (int64_t i = 0; i < d.kernel_h; ++i) {
      for (int64_t j = 0; j < d.kernel_w; ++j) {
        image.tap_column(d, i, j, column);
        const ScopeWindow<T> window(d, channel_scope, i, j);
        const int64_t offset_index = d.kernel_offset_index(n, c, i * d.kernel_w + j, 0);
        const T* __restrict dy = kernel_offset + offset_index;
        const T* __restrict dx = dy + positions;
        T* __restrict grad_dy =
            grad_kernel_offset ? grad_kernel_offset + offset_index : unused_offset_grads;
        T* __restrict grad_dx = grad_dy + positions;
        T misses = 0;
        // The window cells' gradients, sum_k v t_y(a) t_x(b), as 16 named sums: GCC vectorises a
        // reduction into scalars, but not one into an array.
        T s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
        T s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
#pragma omp simd reduction(+ : misses, s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, \
                               s23, s30, s31, s32, s33)
        for (int64_t k = 0; k < positions; ++k) {
          const T ry = window.rigid_y + dy[k], rx = window.rigid_x + dx[k];
          const T held = ScopeWindow<T>::holds(ry, rx);
          T ty[kSize], tx[kSize];
#pragma GCC unroll 4
          for (int a = 0; a < kSize; ++a) {
            ty[a] = tent(ry - T(a), held);
            tx[a] = tent(rx - T(a), held);
          }
          // rows[a] = sum_b t_x(b) cell[a][b], columns[a] = sum_b t_y(b) cell[b][a]
          T rows[kSize], columns[kSize];
#pragma GCC unroll 4
          for (int a = 0; a < kSize; ++a) {
            rows[a] = columns[a] = 0;
#pragma GCC unroll 4
            for (int b = 0; b < kSize; ++b) {
              rows[a] += tx[b] * window.cells[a * kSize + b];
              columns[a] += ty[b] * window.cells[b * kSize + a];
            }
          }
          T w = 0;
#pragma GCC unroll 4
          for (int a = 0; a < kSize; ++a) w += ty[a] * rows[a];
          const T w_dy = window_slope(ry, rows), w_dx = window_slope(rx, columns);
          const T g = go[k];
          const T v = g * column[k];  // dL/dW(q)
          const T inside = window.inside(ry, rx);
          grad_dy[k] = v * inside * w_dy;
          grad_dx[k] = v * inside * w_dx;
          input_grads[k] = g * w;
          const T v0 = v * ty[0], v1 = v * ty[1], v2 = v * ty[2], v3 = v * ty[3];
          s00 += v0 * tx[0]; s01 += v0 * tx[1]; s02 += v0 * tx[2]; s03 += v0 * tx[3];
          s10 += v1 * tx[0]; s11 += v1 * tx[1]; s12 += v1 * tx[2]; s13 += v1 * tx[3];
          s20 += v2 * tx[0]; s21 += v2 * tx[1]; s22 += v2 * tx[2]; s23 += v2 * tx[3];
          s30 += v3 * tx[0]; s31 += v3 * tx[1]; s32 += v3 * tx[2]; s33 += v3 * tx[3];
          misses += 1 - held;
        }
        const T cell_grads[kSize * kSize] = {s00, s01, s02, s03, s10, s11, s12, s13,
                                             s20, s21, s22, s23, s30, s31, s32, s33};
        for (int a = 0; a < kSize; ++a) {
          for (int b = 0; b < kSize; ++b) {
            const int64_t y = window.first_y + a, x = window.first_x + b;
            if (y < 0 || y >= d.scope_h || x < 0 || x >= d.scope_w) continue;
            scope_grad[y * d.scope_w + x] += cell_grads[a * kSize + b];
          }
        }
        if (misses > 0) {
          for (int64_t k = 0; k < positions; ++k) {
            const T ry = window.rigid_y + dy[k], rx = window.rigid_x + dx[k];
            if (ScopeWindow<T>::holds(ry, rx) > 0) continue;
            const T g = go[k], v = g * column[k];
            T w = 0, w_dy = 0, w_dx = 0;
            for_each_corner(exact_scope_point(d, i, j, dy[k], dx[k]), d.scope_h, d.scope_w,
                            [&](int64_t y, int64_t x, T weight, T weight_dy, T weight_dx) {
                              const T cell = channel_scope[y * d.scope_w + x];
                              w += weight * cell;
                              w_dy += weight_dy * cell;
                              w_dx += weight_dx * cell;
                              scope_grad[y * d.scope_w + x] += weight * v;
                            });
            grad_dy[k] = v * w_dy;
            grad_dx[k] = v * w_dx;
            input_grads[k] = g * w;
          }
        }
        if (grad_input) grad_image.add_tap_column(d, i, j, input_grads);
      }
    }
    if (grad_input) grad_image.copy_out(d, grad_input + plane);
  }
  if (grad_scope) std::copy(scope_grad.begin(), scope_grad.end(), grad_scope + c * d.cells);
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

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

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
