// CPU kernels of deform_kernel_conv2d: the local path's column kernels and the global path's
// (the shared driver does layouts, GEMMs and convolutions).
//
// A row of Z, the scope columns, is Z[col] = sum_taps B_s(q) * m * X(p) laid out as
// (groups, S, C_in/groups); the input is channels-last. For one column and one tap the
// bilinear corners (of the image and of the scope) are found once, then applied to all
// channels of an offset group as AXPYs and dot products over contiguous channels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../deform_kernel_conv2d.h"
#include "../global_kernel.h"
#include "../sampling.h"
#include "depthwise_cpu.h"
#include "vector_clones.h"

namespace dk_ops {
namespace {

using at::Tensor;

// The cells one bilinear sample reads: flat index (y * W + x) with the weight and its
// derivatives along y and x. A rigid-grid sample is a single cell of weight 1.
template <typename T>
struct Corners {
  int count = 0;
  int64_t index[4];
  T weight[4], d_dy[4], d_dx[4];
};

template <typename T>
Corners<T> corners_of(const BilinearPoint<T>& point, int64_t height, int64_t width) {
  Corners<T> corners;
  for_each_corner(point, height, width, [&](int64_t y, int64_t x, T w, T wdy, T wdx) {
    const int k = corners.count++;
    corners.index[k] = y * width + x;
    corners.weight[k] = w;
    corners.d_dy[k] = wdy;
    corners.d_dx[k] = wdx;
  });
  return corners;
}

// A run of input channels [begin, end) sharing conv group, kernel offset group and deform
// group; z_begin is the offset of its first channel at scope cell 0 in a row of Z.
struct ChannelRun {
  int64_t begin, end, group, kernel_group, deform_group, z_begin;
  int64_t size() const { return end - begin; }
};

// The input channels cut into runs at every group, kernel offset group and deform group edge.
std::vector<ChannelRun> channel_runs(const DeformKernelGeometry& g) {
  const int64_t per_group = g.in_channels / g.groups;
  const int64_t per_kernel_group = g.in_channels / g.kernel_offset_groups;
  const int64_t per_deform_group = g.in_channels / g.deform_groups;
  std::vector<ChannelRun> runs;
  for (int64_t c = 0; c < g.in_channels;) {
    const int64_t next = std::min({g.in_channels, (c / per_group + 1) * per_group,
                                   (c / per_kernel_group + 1) * per_kernel_group,
                                   (c / per_deform_group + 1) * per_deform_group});
    const int64_t group = c / per_group;
    runs.push_back({c, next, group, c / per_kernel_group, c / per_deform_group,
                    group * g.scope_cells() * per_group + (c - group * per_group)});
    c = next;
  }
  return runs;
}

// One column: its index in the batch, where its image starts in the channels-last input,
// and the rigid-grid input pixel of tap (0, 0).
struct Column {
  int64_t index, image_start, y, x;
};

// Typed view of a ColumnChunk: the samples of one (column, tap, channel run). Everything
// that does not depend on the column is worked out once here, so that the per-sample work
// is a few multiply-adds and no integer divisions (which cost more than the channel loops
// for small channel counts).
template <typename T>
struct Sampler {
  const DeformKernelGeometry& g;
  const T* input;
  const T* kernel_offset;
  const T* data_offset;  // null: rigid data grid
  const T* mask;         // null: no modulation
  int64_t all_columns;   // N * L, the row length of the offset columns
  int64_t z_cell;        // distance between scope cells in a row of Z (C_in / groups)
  std::vector<int64_t> tap_dy, tap_dx;  // input pixel of each tap relative to tap (0, 0)
  std::vector<T> tap_qy, tap_qx;        // scope coordinate of each tap at zero offset

  explicit Sampler(const ColumnChunk& c)
      : g(c.g),
        input(c.input.data_ptr<T>()),
        kernel_offset(c.kernel_offset.data_ptr<T>()),
        data_offset(c.data_offset.defined() ? c.data_offset.data_ptr<T>() : nullptr),
        mask(c.mask.defined() ? c.mask.data_ptr<T>() : nullptr),
        all_columns(c.kernel_offset.size(1)),
        z_cell(g.in_channels / g.groups) {
    for (int64_t i = 0; i < g.kernel_h; ++i) {
      for (int64_t j = 0; j < g.kernel_w; ++j) {
        tap_dy.push_back(i * g.dilation_h);
        tap_dx.push_back(j * g.dilation_w);
        tap_qy.push_back(T(g.scope_origin_h() + i));
        tap_qx.push_back(T(g.scope_origin_w() + j));
      }
    }
  }

  Column column(int64_t col) const {
    const int64_t n = col / g.positions(), position = col - n * g.positions();
    const int64_t out_y = position / g.out_w, out_x = position - out_y * g.out_w;
    return {col, n * g.height * g.width * g.in_channels, out_y * g.stride_h - g.pad_h,
            out_x * g.stride_w - g.pad_w};
  }

  // Scope corners of `tap` for kernel offset group `kg` at column `col` (of the batch).
  Corners<T> kernel_corners(int64_t kg, int64_t tap, int64_t col) const {
    const T* dy = kernel_offset + 2 * (kg * g.taps() + tap) * all_columns + col;
    return corners_of(locate<T>(tap_qy[tap] + dy[0], tap_qx[tap] + dy[all_columns], g.scope_h,
                                g.scope_w),
                      g.scope_h, g.scope_w);
  }

  // Input corners of `tap` for deform group `dg` at column `col`, as pixels of its image.
  Corners<T> data_corners(int64_t dg, int64_t tap, const Column& col) const {
    const int64_t y = col.y + tap_dy[tap], x = col.x + tap_dx[tap];
    if (data_offset) {
      const T* dy = data_offset + 2 * (dg * g.taps() + tap) * all_columns + col.index;
      return corners_of(locate<T>(T(y) + dy[0], T(x) + dy[all_columns], g.height, g.width),
                        g.height, g.width);
    }
    Corners<T> corners;
    if (y >= 0 && y < g.height && x >= 0 && x < g.width) {
      corners.count = 1;
      corners.index[0] = y * g.width + x;
      corners.weight[0] = 1;
      corners.d_dy[0] = corners.d_dx[0] = 0;
    }
    return corners;
  }

  T modulation(int64_t dg, int64_t tap, int64_t col) const {
    return mask ? mask[(dg * g.taps() + tap) * all_columns + col] : T(1);
  }

  // Offset of the run's first channel at `pixel` of the column's image in a channels-last
  // (N, H, W, C_in) tensor: the input or its gradient.
  int64_t pixel_offset(const Column& col, int64_t pixel, const ChannelRun& run) const {
    return col.image_start + pixel * g.in_channels + run.begin;
  }

  // Offset of (scope cell, first channel of run) inside a row of Z.
  int64_t z_offset(const ChannelRun& run, int64_t cell) const { return run.z_begin + cell * z_cell; }
};

// The loops over columns below are DK_VECTOR_CLONES (vector_clones.h).

// y += a * x
template <typename T>
inline void axpy(T a, const T* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T sum = 0;
  // Lets the compiler reorder the sum into SIMD lanes (honoured in the -fopenmp build).
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// The run's input channels sampled at the data corners, times `scale`, as (values, factor):
// the sample is factor * values[c]. One corner (the rigid grid) is read in place, several
// are summed into `buffer`.
template <typename T>
inline std::pair<const T*, T> input_sample(const Sampler<T>& s, const Column& col,
                                           const ChannelRun& run, const Corners<T>& data,
                                           T scale, T* buffer) {
  if (data.count == 1) {
    return {s.input + s.pixel_offset(col, data.index[0], run), scale * data.weight[0]};
  }
  std::fill(buffer, buffer + run.size(), T(0));
  for (int k = 0; k < data.count; ++k) {
    axpy(scale * data.weight[k], s.input + s.pixel_offset(col, data.index[k], run), buffer,
         run.size());
  }
  return {buffer, T(1)};
}

// sum = sum_k B_k(q) gZ[cell k] over the run's channels: the gradient of the kernel sample.
template <typename T>
inline void scope_sum(const Sampler<T>& s, const T* gz_col, const ChannelRun& run,
                      const Corners<T>& kernel, T* sum) {
  std::fill(sum, sum + run.size(), T(0));
  for (int k = 0; k < kernel.count; ++k) {
    axpy(kernel.weight[k], gz_col + s.z_offset(run, kernel.index[k]), sum, run.size());
  }
}

// Calls visit(local, col, tap, run, kernel, data, m) for every (column, tap, channel run) of
// chunk columns first + [begin, end) whose kernel and data samples both read something:
// `local` is the column's row in the chunk's Z, m its modulation.
template <typename T, typename Visit>
__attribute__((always_inline)) inline void for_each_sample(const Sampler<T>& s,
                                                           const std::vector<ChannelRun>& runs,
                                                           int64_t first, int64_t begin,
                                                           int64_t end, Visit&& visit) {
  for (int64_t local = begin; local < end; ++local) {
    const auto col = s.column(first + local);
    for (int64_t tap = 0; tap < s.g.taps(); ++tap) {
      for (const auto& run : runs) {
        const auto kernel = s.kernel_corners(run.kernel_group, tap, col.index);
        const auto data = s.data_corners(run.deform_group, tap, col);
        if (kernel.count == 0 || data.count == 0) continue;
        visit(local, col, tap, run, kernel, data, s.modulation(run.deform_group, tap, col.index));
      }
    }
  }
}

// Rows [begin, end) of z: the scope columns of chunk columns first + [begin, end).
// `sample` holds one run's channels.
template <typename T>
DK_VECTOR_CLONES void scatter_columns(const Sampler<T>& s, const std::vector<ChannelRun>& runs,
                                      int64_t first, int64_t begin, int64_t end, T* z,
                                      int64_t z_row, T* sample) {
  // A few rows at a time: zeroed, then summed into while they are still in cache.
  constexpr int64_t kRowsPerBlock = 8;
  for (int64_t block = begin; block < end; block += kRowsPerBlock) {
    const int64_t block_end = std::min(end, block + kRowsPerBlock);
    std::fill(z + block * z_row, z + block_end * z_row, T(0));
    for_each_sample(s, runs, first, block, block_end,
                    [&](int64_t local, const Column& col, int64_t, const ChannelRun& run,
                        const Corners<T>& kernel, const Corners<T>& data, T m)
                        __attribute__((always_inline)) {
      const auto [v, scale] = input_sample(s, col, run, data, m, sample);
      T* z_col = z + local * z_row;
      for (int k = 0; k < kernel.count; ++k) {
        axpy(scale * kernel.weight[k], v, z_col + s.z_offset(run, kernel.index[k]), run.size());
      }
    });
  }
}

// grad_input += the input gradient that the chunk's grad_z carries, column by column (the
// data offsets may send any column to any pixel). `grad` holds one run's channels.
template <typename T>
DK_VECTOR_CLONES void gather_columns(const Sampler<T>& s, const std::vector<ChannelRun>& runs,
                                     int64_t first, int64_t count, const T* grad_z,
                                     int64_t z_row, T* grad_input, T* grad) {
  for_each_sample(s, runs, first, 0, count,
                  [&](int64_t local, const Column& col, int64_t, const ChannelRun& run,
                      const Corners<T>& kernel, const Corners<T>& data, T m)
                      __attribute__((always_inline)) {
    const T* gz_col = grad_z + local * z_row;
    if (data.count == 1) {  // one input cell (an integer offset): gather straight into it
      T* gx = grad_input + s.pixel_offset(col, data.index[0], run);
      for (int k = 0; k < kernel.count; ++k) {
        axpy(m * data.weight[0] * kernel.weight[k], gz_col + s.z_offset(run, kernel.index[k]), gx,
             run.size());
      }
      return;
    }
    scope_sum(s, gz_col, run, kernel, grad);
    for (int k = 0; k < data.count; ++k) {
      axpy(m * data.weight[k], grad, grad_input + s.pixel_offset(col, data.index[k], run),
           run.size());
    }
  });
}

// The same on a rigid data grid, for the pixels of rows [row_begin, row_end) of the
// flattened (N*H, W) input and columns [x_begin, x_end): each pixel sums what the chunk's
// (column, tap) pairs that read it carry, so threads that own pixels never write the same
// memory.
template <typename T>
DK_VECTOR_CLONES void gather_rigid_pixels(const Sampler<T>& s, const std::vector<ChannelRun>& runs,
                                          int64_t first, int64_t count, const T* grad_z,
                                          int64_t z_row, int64_t row_begin, int64_t row_end,
                                          int64_t x_begin, int64_t x_end, T* grad_input) {
  const auto& g = s.g;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / g.height, y = row % g.height;
    for (int64_t x = x_begin; x < x_end; ++x) {
      T* gx = grad_input + (row * g.width + x) * g.in_channels;
      for (int64_t tap = 0; tap < g.taps(); ++tap) {
        const int64_t out_y = output_that_reads(y, s.tap_dy[tap], g.stride_h, g.pad_h, g.out_h);
        const int64_t out_x = output_that_reads(x, s.tap_dx[tap], g.stride_w, g.pad_w, g.out_w);
        if (out_y < 0 || out_x < 0) continue;
        const int64_t col = n * g.positions() + out_y * g.out_w + out_x;
        if (col < first || col >= first + count) continue;  // a column of another chunk
        const T* gz_col = grad_z + (col - first) * z_row;
        for (const auto& run : runs) {
          const auto kernel = s.kernel_corners(run.kernel_group, tap, col);
          const T m = s.modulation(run.deform_group, tap, col);
          for (int k = 0; k < kernel.count; ++k) {
            axpy(m * kernel.weight[k], gz_col + s.z_offset(run, kernel.index[k]),
                 gx + run.begin, run.size());
          }
        }
      }
    }
  }
}

// Offset and mask gradients (null: not wanted) of chunk columns first + [begin, end).
// For one (column, tap, run), with G_c = sum_s B_s(q) gZ[s, c]:
//   d/dq (kernel offset) = m * sum_c X_c(p) * sum_s dB_s/dq * gZ[s, c]
//   d/dm (mask)          = sum_c X_c(p) * G_c
//   d/dp (data offset)   = m * sum_c dX_c/dp * G_c
// `buffer` holds one run's channels.
template <typename T>
DK_VECTOR_CLONES void offset_and_mask_columns(const Sampler<T>& s,
                                              const std::vector<ChannelRun>& runs, int64_t first,
                                              int64_t begin, int64_t end, const T* grad_z,
                                              int64_t z_row, T* gko, T* gdo, T* gm, T* buffer) {
  const int64_t stride = s.all_columns, taps = s.g.taps();
  for_each_sample(s, runs, first, begin, end,
                  [&](int64_t local, const Column& col, int64_t tap, const ChannelRun& run,
                      const Corners<T>& kernel, const Corners<T>& data, T m)
                      __attribute__((always_inline)) {
    const T* gz_col = grad_z + local * z_row;
    const int64_t deform_row = run.deform_group * taps + tap;
    if (gko) {  // X(p), then a dot with gZ at each scope corner
      const auto [x, scale] = input_sample(s, col, run, data, T(1), buffer);
      T dy = 0, dx = 0;
      for (int k = 0; k < kernel.count; ++k) {
        const T d = dot(x, gz_col + s.z_offset(run, kernel.index[k]), run.size());
        dy += kernel.d_dy[k] * d;
        dx += kernel.d_dx[k] * d;
      }
      T* out = gko + 2 * (run.kernel_group * taps + tap) * stride + col.index;
      out[0] += m * scale * dy;
      out[stride] += m * scale * dx;
    }
    if (gdo || gm) {  // buffer = G, then a dot with the input at each image corner
      scope_sum(s, gz_col, run, kernel, buffer);
      T sample = 0, dy = 0, dx = 0;
      for (int k = 0; k < data.count; ++k) {
        const T d = dot(buffer, s.input + s.pixel_offset(col, data.index[k], run), run.size());
        sample += data.weight[k] * d;
        dy += data.d_dy[k] * d;
        dx += data.d_dx[k] * d;
      }
      if (gm) gm[deform_row * stride + col.index] += sample;
      if (gdo) {
        T* out = gdo + 2 * deform_row * stride + col.index;
        out[0] += m * dy;
        out[stride] += m * dx;
      }
    }
  });
}

// Parallelism without atomics, so results do not depend on the number of threads: Z and the
// offset/mask gradients are split by columns (a thread owns its columns), grad_input on a
// rigid grid by strips of input pixels (a thread owns its strips). With data offsets any
// column may read any pixel, and grad_input is gathered on one thread: split by channels
// (a thread owning its channels of every pixel) it ran 1.3-2.6x slower than on one thread
// (2-core EPYC, c3-c5, scope 4), the threads' halves of every pixel row and of every cell
// of grad_z fighting over the cache.

template <typename T>
void scatter_scope_columns_impl(const ColumnChunk& chunk, Tensor& z) {
  const Sampler<T> s(chunk);
  const auto runs = channel_runs(chunk.g);
  at::parallel_for(0, chunk.count, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> sample(chunk.g.in_channels);
    scatter_columns(s, runs, chunk.first, begin, end, z.data_ptr<T>(), z.size(1), sample.data());
  });
}

template <typename T>
void gather_input_grad_impl(const ColumnChunk& chunk, const Tensor& grad_z, Tensor& grad_input) {
  const Sampler<T> s(chunk);
  const auto runs = channel_runs(chunk.g);
  if (!chunk.data_offset.defined()) {
    // In strips a few pixels wide, so that the grad_z rows a strip reads (those of the
    // columns around it) stay in the core's cache while its rows are swept (2-core EPYC,
    // c3 scope 4, one backward: 17-21 ms on one thread in 8-pixel strips, 22-25 ms in whole
    // rows; on two threads 9-12 ms, where the column-by-column gather took 13 ms).
    constexpr int64_t kStripWidth = 8;
    const auto [row_begin, row_end] = rigid_input_rows(chunk);
    const int64_t width = chunk.g.width, strips = (width + kStripWidth - 1) / kStripWidth;
    at::parallel_for(0, strips, 1, [&](int64_t strip_begin, int64_t strip_end) {
      for (int64_t strip = strip_begin; strip < strip_end; ++strip) {
        gather_rigid_pixels(s, runs, chunk.first, chunk.count, grad_z.data_ptr<T>(),
                            grad_z.size(1), row_begin, row_end, strip * kStripWidth,
                            std::min(width, (strip + 1) * kStripWidth), grad_input.data_ptr<T>());
      }
    });
    return;
  }
  std::vector<T> grad(chunk.g.in_channels);
  gather_columns(s, runs, chunk.first, chunk.count, grad_z.data_ptr<T>(), grad_z.size(1),
                 grad_input.data_ptr<T>(), grad.data());
}

template <typename T>
void offset_and_mask_grads_impl(const ColumnChunk& chunk, const Tensor& grad_z,
                                Tensor& grad_kernel_offset, Tensor& grad_data_offset,
                                Tensor& grad_mask) {
  const Sampler<T> s(chunk);
  const auto runs = channel_runs(chunk.g);
  auto data_or_null = [](Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
  T* gko = data_or_null(grad_kernel_offset);
  T* gdo = data_or_null(grad_data_offset);
  T* gm = data_or_null(grad_mask);
  at::parallel_for(0, chunk.count, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> buffer(chunk.g.in_channels);
    offset_and_mask_columns(s, runs, chunk.first, begin, end, grad_z.data_ptr<T>(),
                            grad_z.size(1), gko, gdo, gm, buffer.data());
  });
}

void scatter_scope_columns(const ColumnChunk& chunk, Tensor& z) {
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "dk_ops_scatter_scope_columns",
                             [&] { scatter_scope_columns_impl<scalar_t>(chunk, z); });
}

void gather_input_grad(const ColumnChunk& chunk, const Tensor& grad_z, Tensor& grad_input) {
  AT_DISPATCH_FLOATING_TYPES(grad_z.scalar_type(), "dk_ops_gather_input_grad",
                             [&] { gather_input_grad_impl<scalar_t>(chunk, grad_z, grad_input); });
}

void offset_and_mask_grads(const ColumnChunk& chunk, const Tensor& grad_z,
                           Tensor& grad_kernel_offset, Tensor& grad_data_offset,
                           Tensor& grad_mask) {
  AT_DISPATCH_FLOATING_TYPES(grad_z.scalar_type(), "dk_ops_offset_and_mask_grads", [&] {
    offset_and_mask_grads_impl<scalar_t>(chunk, grad_z, grad_kernel_offset, grad_data_offset,
                                         grad_mask);
  });
}

// ------------------------------------------------------------------ global path
//
// Per scope entry the work is a few dozen multiply-adds (c5: 512 x 512 entries of 16 cells, 9
// taps), so what counts is what surrounds them: the loops below walk the entries in runs that
// share a kernel offset group (no division per entry), keep many independent sums side by side
// (a chain of sums into one place waits on each addition), and are DK_VECTOR_CLONES (AVX2 + FMA,
// twice as fast as the baseline's 4-wide vectors on the 2-core EPYC). At c5, batch 2, they took a
// third to a tenth of the time of per-entry corner loops.

// The blocks of cells, taps and entries that the sums below are kept in.
constexpr int64_t kCellBlock = 16, kTapBlock = 3, kEntryBlock = 64;
// The entries sampled side by side: a vector register's worth, twice over for AVX2 and float.
constexpr int64_t kSampleEntries = 16;
// Enough parts to keep a many-core CPU busy, few enough that their sums stay small.
constexpr int64_t kOffsetGradParts = 16;

// The bilinear samples of every (image, kernel offset group, tap): four (cell, weight) pairs each,
// weight 0 for corners outside the scope, so that the sampling loop has no branches; and the
// weights and their derivatives along the offsets as dense (taps, cells) matrices.
template <typename T>
struct GlobalSamples {
  int64_t taps, cells, kernel_groups;
  std::vector<int64_t> corner_cell;  // (N, Gk, taps, 4)
  std::vector<T> corner_weight;      // (N, Gk, taps, 4)
  std::vector<T> weight, d_dy, d_dx;  // (N, Gk, taps, cells)

  GlobalSamples(const GlobalGeometry& geometry, const Tensor& kernel_offset)
      : taps(geometry.taps), cells(geometry.cells), kernel_groups(geometry.kernel_groups) {
    const int64_t matrices = geometry.batch * geometry.kernel_groups;
    corner_cell.assign(matrices * taps * 4, 0);
    corner_weight.assign(matrices * taps * 4, T(0));
    weight.assign(matrices * taps * cells, T(0));
    d_dy.assign(matrices * taps * cells, T(0));
    d_dx.assign(matrices * taps * cells, T(0));
    const T* offset = kernel_offset.data_ptr<T>();
    for (int64_t n = 0; n < geometry.batch; ++n) {
      for (int64_t kg = 0; kg < geometry.kernel_groups; ++kg) {
        for (int64_t tap = 0; tap < taps; ++tap) {
          const int64_t sample = (n * geometry.kernel_groups + kg) * taps + tap;
          int corner = 0;
          for_each_corner(geometry.point<T>(offset, n, kg, tap), geometry.scope_h, geometry.scope_w,
                          [&](int64_t y, int64_t x, T w, T wdy, T wdx) {
                            const int64_t cell = y * geometry.scope_w + x;
                            corner_cell[sample * 4 + corner] = cell;
                            corner_weight[sample * 4 + corner++] = w;
                            weight[sample * cells + cell] = w;
                            d_dy[sample * cells + cell] = wdy;
                            d_dx[sample * cells + cell] = wdx;
                          });
        }
      }
    }
  }

  // First sample or matrix row of image n, kernel offset group kg.
  int64_t first_tap(int64_t n, int64_t kg) const { return (n * kernel_groups + kg) * taps; }
};

// Calls visit(first_entry, end_entry, kg) for the scope entries of output channels [begin, end),
// in runs of input channels that share a kernel offset group.
template <typename Visit>
void for_each_kernel_group_run(const GlobalGeometry& geometry, int64_t begin, int64_t end,
                               Visit&& visit) {
  for (int64_t o = begin; o < end; ++o) {
    const int64_t first_channel = (o / geometry.group_out) * geometry.group_in;
    for (int64_t i = 0; i < geometry.group_in;) {
      const int64_t kg = (first_channel + i) / geometry.kernel_group_channels;
      const int64_t run_end =
          std::min(geometry.group_in, (kg + 1) * geometry.kernel_group_channels - first_channel);
      visit(o * geometry.group_in + i, o * geometry.group_in + run_end, kg);
      i = run_end;
    }
  }
}

// Output channels per parallel task: a few thousand entries.
int64_t output_channels_per_task(const GlobalGeometry& geometry) {
  return std::max<int64_t>(1, 4096 / geometry.group_in);
}

// filters[n, e, tap] for the entries [first, last) of kernel offset group kg, every image,
// kSampleEntries entries at a time: their scope rows turned to columns once for all images, so
// that each tap is four multiply-adds of whole vectors of entries, then written out in the
// filters' (entry, tap) order.
template <typename T>
DK_VECTOR_CLONES void sample_filters_run(const GlobalGeometry& geometry, const GlobalSamples<T>& s,
                                         const T* scope, T* filters, int64_t first,
                                         int64_t last, int64_t kg) {
  const int64_t taps = geometry.taps, cells = geometry.cells;
  std::vector<T> cell_columns(cells * kSampleEntries), sampled(taps * kSampleEntries);
  for (int64_t e0 = first; e0 < last; e0 += kSampleEntries) {
    const int64_t count = std::min(kSampleEntries, last - e0);
    for (int64_t cell = 0; cell < cells; ++cell) {
      for (int64_t e = 0; e < kSampleEntries; ++e) {
        cell_columns[cell * kSampleEntries + e] = e < count ? scope[(e0 + e) * cells + cell] : T(0);
      }
    }
    for (int64_t n = 0; n < geometry.batch; ++n) {
      const int64_t* cell = &s.corner_cell[s.first_tap(n, kg) * 4];
      const T* w = &s.corner_weight[s.first_tap(n, kg) * 4];
      for (int64_t tap = 0; tap < taps; ++tap, cell += 4, w += 4) {
        const T* __restrict c0 = &cell_columns[cell[0] * kSampleEntries];
        const T* __restrict c1 = &cell_columns[cell[1] * kSampleEntries];
        const T* __restrict c2 = &cell_columns[cell[2] * kSampleEntries];
        const T* __restrict c3 = &cell_columns[cell[3] * kSampleEntries];
        T* __restrict out = &sampled[tap * kSampleEntries];
#pragma omp simd
        for (int64_t e = 0; e < kSampleEntries; ++e) {
          out[e] = w[0] * c0[e] + w[1] * c1[e] + w[2] * c2[e] + w[3] * c3[e];
        }
      }
      T* __restrict image_filters = filters + (n * geometry.entries + e0) * taps;
      for (int64_t e = 0; e < count; ++e) {
        for (int64_t tap = 0; tap < taps; ++tap) {
          image_filters[e * taps + tap] = sampled[tap * kSampleEntries + e];
        }
      }
    }
  }
}

// grad_weight[e] = sum over images of A[n, kg]^T @ grad_filters[n, e], for the entries
// [first, last) of kernel offset group kg, a block of entries at a time so that the sums of
// different entries, independent of each other, follow one another.
template <typename T>
DK_VECTOR_CLONES void weight_grad_run(const GlobalGeometry& geometry, const GlobalSamples<T>& s,
                                      const T* grad_filters, T* grad_weight, int64_t first,
                                      int64_t last, int64_t kg) {
  const int64_t taps = geometry.taps, cells = geometry.cells;
  for (int64_t e0 = first; e0 < last; e0 += kEntryBlock) {
    const int64_t e1 = std::min(last, e0 + kEntryBlock);
    std::fill(grad_weight + e0 * cells, grad_weight + e1 * cells, T(0));
    for (int64_t n = 0; n < geometry.batch; ++n) {
      const T* __restrict grad_taps = grad_filters + n * geometry.entries * taps;
      for (int64_t tap = 0; tap < taps; ++tap) {
        const T* __restrict a = &s.weight[(s.first_tap(n, kg) + tap) * cells];
        for (int64_t entry = e0; entry < e1; ++entry) {
          const T value = grad_taps[entry * taps + tap];
          T* __restrict sums = grad_weight + entry * cells;
#pragma omp simd
          for (int64_t c = 0; c < cells; ++c) sums[c] += value * a[c];
        }
      }
    }
  }
}

// m[n] (taps, cells) += sum over the entries [first, last) of grad_filters[n, e] scope[e]^T,
// summed in T over blocks of entries, in double across them. WholeBlocks: the cells are a multiple
// of kCellBlock, so that every block has a width known at compile time.
template <bool WholeBlocks, typename T>
DK_VECTOR_CLONES void offset_grad_run(const GlobalGeometry& geometry, const T* grad_filters,
                                      const T* scope, double* m, int64_t first, int64_t last,
                                      int64_t kg) {
  const int64_t taps = geometry.taps, cells = geometry.cells;
  for (int64_t e0 = first; e0 < last; e0 += kEntryBlock) {
    const int64_t e1 = std::min(last, e0 + kEntryBlock);
    for (int64_t n = 0; n < geometry.batch; ++n) {
      double* m_n = m + (n * geometry.kernel_groups + kg) * taps * cells;
      for (int64_t t0 = 0; t0 < taps; t0 += kTapBlock) {
        for (int64_t c0 = 0; c0 < cells; c0 += kCellBlock) {
          T sums[kTapBlock][kCellBlock] = {};
          const int64_t block = WholeBlocks ? kCellBlock : std::min(kCellBlock, cells - c0);
          for (int64_t entry = e0; entry < e1; ++entry) {
            const T* __restrict grad_taps = grad_filters + (n * geometry.entries + entry) * taps + t0;
            const T* __restrict row = scope + entry * cells + c0;
            for (int64_t t = 0; t < kTapBlock; ++t) {
              const T value = t0 + t < taps ? grad_taps[t] : T(0);
#pragma omp simd
              for (int64_t c = 0; c < block; ++c) sums[t][c] += value * row[c];
            }
          }
          for (int64_t t = 0; t < kTapBlock && t0 + t < taps; ++t) {
            for (int64_t c = 0; c < block; ++c) m_n[(t0 + t) * cells + c0 + c] += sums[t][c];
          }
        }
      }
    }
  }
}

template <typename T>
void sample_global_filters_impl(const DeformKernelGeometry& g, const Tensor& weight,
                                const Tensor& kernel_offset, Tensor& filters) {
  const auto geometry = GlobalGeometry::of(g);
  const GlobalSamples<T> samples(geometry, kernel_offset);
  const T* scope = weight.data_ptr<T>();
  T* out = filters.data_ptr<T>();
  const int64_t grain = output_channels_per_task(geometry);
  at::parallel_for(0, g.out_channels, grain, [&](int64_t begin, int64_t end) {
    for_each_kernel_group_run(geometry, begin, end, [&](int64_t first, int64_t last, int64_t kg) {
      sample_filters_run(geometry, samples, scope, out, first, last, kg);
    });
  });
}

template <typename T>
void global_weight_grad_impl(const DeformKernelGeometry& g, const Tensor& grad_filters,
                             const Tensor& kernel_offset, Tensor& grad_weight) {
  const auto geometry = GlobalGeometry::of(g);
  const GlobalSamples<T> samples(geometry, kernel_offset);
  const T* grad = grad_filters.data_ptr<T>();
  T* out = grad_weight.data_ptr<T>();
  const int64_t grain = output_channels_per_task(geometry);
  at::parallel_for(0, g.out_channels, grain, [&](int64_t begin, int64_t end) {
    for_each_kernel_group_run(geometry, begin, end, [&](int64_t first, int64_t last, int64_t kg) {
      weight_grad_run(geometry, samples, grad, out, first, last, kg);
    });
  });
}

// grad_kernel_offset[n, kg, tap] = sum over cells of M[n, kg] * dA[n, kg] along y and x, with
// M[n, kg] (taps, cells) = sum over the group's entries of grad_filters[n, e] scope[e]^T. The
// output channels are cut into kOffsetGradParts parts (fewer for fewer channels), each with its
// own M, summed in order: the sums depend neither on the scheduling nor on the thread count.
template <typename T>
void global_offset_grad_impl(const DeformKernelGeometry& g, const Tensor& grad_filters,
                             const Tensor& weight, const Tensor& kernel_offset,
                             Tensor& grad_kernel_offset) {
  const auto geometry = GlobalGeometry::of(g);
  const GlobalSamples<T> samples(geometry, kernel_offset);
  const T* grad = grad_filters.data_ptr<T>();
  const T* scope = weight.data_ptr<T>();
  const int64_t matrix_size = geometry.batch * geometry.kernel_groups * geometry.taps * geometry.cells;
  const int64_t parts = std::min<int64_t>(kOffsetGradParts, g.out_channels);
  std::vector<double> part_sums(parts * matrix_size, 0.0);
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    for (int64_t part = part_begin; part < part_end; ++part) {
      for_each_kernel_group_run(
          geometry, part * g.out_channels / parts, (part + 1) * g.out_channels / parts,
          [&](int64_t first, int64_t last, int64_t kg) {
            double* sums = &part_sums[part * matrix_size];
            if (geometry.cells % kCellBlock == 0) {
              offset_grad_run<true>(geometry, grad, scope, sums, first, last, kg);
            } else {
              offset_grad_run<false>(geometry, grad, scope, sums, first, last, kg);
            }
          });
    }
  });
  T* out = grad_kernel_offset.data_ptr<T>();
  for (int64_t row = 0; row < geometry.batch * geometry.kernel_groups * geometry.taps; ++row) {
    double along_y = 0, along_x = 0;
    for (int64_t part = 0; part < parts; ++part) {
      const double* m = &part_sums[part * matrix_size + row * geometry.cells];
      for (int64_t cell = 0; cell < geometry.cells; ++cell) {
        along_y += m[cell] * samples.d_dy[row * geometry.cells + cell];
        along_x += m[cell] * samples.d_dx[row * geometry.cells + cell];
      }
    }
    out[row * 2] = T(along_y);
    out[row * 2 + 1] = T(along_x);
  }
}

void sample_global_filters(const DeformKernelGeometry& g, const Tensor& weight,
                           const Tensor& kernel_offset, Tensor& filters) {
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "dk_ops_sample_global_filters", [&] {
    sample_global_filters_impl<scalar_t>(g, weight, kernel_offset, filters);
  });
}

void global_weight_grad(const DeformKernelGeometry& g, const Tensor& grad_filters,
                        const Tensor& kernel_offset, Tensor& grad_weight) {
  AT_DISPATCH_FLOATING_TYPES(grad_filters.scalar_type(), "dk_ops_global_weight_grad", [&] {
    global_weight_grad_impl<scalar_t>(g, grad_filters, kernel_offset, grad_weight);
  });
}

void global_offset_grad(const DeformKernelGeometry& g, const Tensor& grad_filters,
                        const Tensor& weight, const Tensor& kernel_offset,
                        Tensor& grad_kernel_offset) {
  AT_DISPATCH_FLOATING_TYPES(grad_filters.scalar_type(), "dk_ops_global_offset_grad", [&] {
    global_offset_grad_impl<scalar_t>(g, grad_filters, weight, kernel_offset, grad_kernel_offset);
  });
}

// OpenMP's thread count for the current task, set for the length of a scope and restored after
// it: inside a parallel region the setting is the task's own.
class OpenMpThreadsGuard {
 public:
  explicit OpenMpThreadsGuard(int threads) : previous_(omp_get_max_threads()) {
    omp_set_num_threads(threads);
  }
  ~OpenMpThreadsGuard() { omp_set_num_threads(previous_); }
  OpenMpThreadsGuard(const OpenMpThreadsGuard&) = delete;
  OpenMpThreadsGuard& operator=(const OpenMpThreadsGuard&) = delete;

 private:
  int previous_;
};

// The images over at::parallel_for's threads, each thread with the caller's thread-local state
// (the dispatch keys the op's kernel runs under, the profiler's) and an OpenMP thread count of
// one: oneDNN plans a convolution for omp_get_max_threads() threads, and inside a parallel region
// it gets one, so that a plan for more left parts of the weight gradient unwritten.
void for_each_image_on_one_thread(int64_t batch, c10::function_ref<void(int64_t)> visit) {
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    const OpenMpThreadsGuard threads_guard(1);
    for (int64_t n = begin; n < end; ++n) visit(n);
  });
}

constexpr DeviceKernels kCpuKernels{
    {scatter_scope_columns, gather_input_grad, offset_and_mask_grads},
    {sample_global_filters, global_weight_grad, global_offset_grad, for_each_image_on_one_thread},
    {depthwise_forward_cpu, depthwise_backward_cpu},
    /*takes_half_and_bfloat16=*/false};

at::Tensor forward_cpu(const Tensor& input, const Tensor& weight, const Tensor& kernel_offset,
                       const std::optional<Tensor>& data_offset, const std::optional<Tensor>& mask,
                       const std::optional<Tensor>& bias, at::IntArrayRef kernel_size,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups, int64_t kernel_offset_groups, int64_t deform_groups) {
  return deform_kernel_conv2d_forward(kCpuKernels, input, weight, kernel_offset, data_offset,
                                      mask, bias, kernel_size, stride, padding, dilation, groups,
                                      kernel_offset_groups, deform_groups);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_cpu(
    const Tensor& grad_output, const Tensor& input, const Tensor& weight,
    const Tensor& kernel_offset, const std::optional<Tensor>& data_offset,
    const std::optional<Tensor>& mask, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    int64_t kernel_offset_groups, int64_t deform_groups, std::array<bool, 5> output_mask) {
  return deform_kernel_conv2d_backward(kCpuKernels, grad_output, input, weight, kernel_offset,
                                       data_offset, mask, kernel_size, stride, padding, dilation,
                                       groups, kernel_offset_groups, deform_groups, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(dk_ops, CPU, m) {
  m.impl("deform_kernel_conv2d", &forward_cpu);
  m.impl("deform_kernel_conv2d_backward", &backward_cpu);
}

}  // namespace dk_ops
