// Implicit-GEMM kernels of the local path: the forward, out = Z @ W'^T per group, and the weight
// gradient, grad W'^T = Z^T @ gO per group, as the driver computes them from the scope columns,
// but without Z in global memory. Opt-in (DK_OPS_LOCAL_KERNELS=implicit_gemm, see the driver)
// until a GPU times them against the columns path (docs/gpu.md): that path writes Z, S * C_in
// values a column, and a GEMM reads it back, the memory traffic that these kernels save; they pay
// for it by sampling each Z tile once per tile of output channels instead of once.
//
// Both work on the same tiles: Z tiles of kColumns columns x (kChannels input channels x kCells
// scope cells) of one group, sampled into shared memory by sample_z_tile (each thread owns one
// (column, channel) and sums its cells with add_scope_pass, the scope-column kernel's own math).
// Entries past the end of the columns, output channels, input channels or scope cells are zeros
// in every tile, so every tail is an ordinary step. Sums and the shared tiles are in acc_t
// (float32 for half and bfloat16: Z is never rounded to them, unlike the columns path). Plain
// CUDA-core FMAs: the next step, once they can be timed, is a tensor-core (mma) version with the
// tiles in the operands' dtype.
//
// Forward: a block owns kColumns columns x kOutChannels output channels of one group and runs
// over the group's K = S * C_in/groups in steps of kChannels x kCells (any order of K gives the
// same sum), each step:
//   1. the Z tile into shared memory (sample_z_tile);
//   2. the W' tile, (kCells x kChannels) x kOutChannels, read from the weight into shared memory;
//   3. __syncthreads, then each thread adds the products of its 4 x 4 outputs (a sub-tile
//      strided over the block's 16 x 16 threads) over the step's K, from registers;
//   4. __syncthreads, before the next step overwrites the tiles.
// Weight gradient: a block owns a K tile (kChannels x kCells) x kOutChannels output channels of
// one group and runs over a range of the columns in steps of kColumns, each step:
//   1. the Z tile into shared memory (sample_z_tile), the same tile as the forward's;
//   2. the gO tile, kColumns x kOutChannels, read from the output gradient's rows;
//   3. __syncthreads, then each thread adds the products of its K entries x 4 output channels
//      over the step's columns, from registers;
//   4. __syncthreads.
// The columns are split into ranges so that K tiles x output tiles x groups x ranges blocks
// fill a GPU (at c3, K = 16 * 128 makes 32 K tiles x 2 output tiles only); each range writes its
// sums to a buffer of its own and the launcher adds the ranges up in a fixed order: no atomics,
// the same result on every run.
//
// A header of its own, so that the opt-in kernels stay apart from the default path's;
// deform_kernel_conv2d_cuda.cu hands its launchers, forward and weight_grad, to the driver.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "../deform_kernel_conv2d.h"
#include "column_view.cuh"
#include "launch.cuh"

namespace dk_ops::cuda_kernels::implicit_gemm {

using at::Tensor;

// The tiles of one block. kColumns * kChannels = kThreadsPerBlock: one (column, channel) to
// sample per thread and step. kCells: the forward's two tiles of kDepth x 64 acc_t take 32 KiB of
// the 48 KiB of static shared memory, the weight gradient's Z and gO tiles 32 KiB in float and
// the whole 48 KiB in double, so a double step covers half the cells of a float one.
template <typename acc_t>
struct ImplicitGemmTile {
  static constexpr int kColumns = 64;
  static constexpr int kOutChannels = 64;
  static constexpr int kChannels = kThreadsPerBlock / kColumns;
  static constexpr int kCells = sizeof(acc_t) > 4 ? 8 : 16;
  static constexpr int kDepth = kCells * kChannels;
  // The threads as a kThreadSide x kThreadSide grid over the output tile; thread (row, col)
  // owns rows row + i * kThreadSide (columns in the forward, K entries in the weight gradient)
  // and output channels col + j * kThreadSide.
  static constexpr int kThreadSide = 16;
  static constexpr int kColumnsPerThread = kColumns / kThreadSide;
  static constexpr int kDepthPerThread = kDepth / kThreadSide;
  static constexpr int kOutPerThread = kOutChannels / kThreadSide;
  static_assert(kColumns * kChannels == kThreadsPerBlock &&
                kThreadSide * kThreadSide == kThreadsPerBlock && kDepth % kThreadSide == 0);
  // Z^T: entry cell * kChannels + channel of the step's K, by column.
  using ZTile = acc_t[kDepth][kColumns];
};

// The blocks an SM must hold at least: with 1, ptxas may give a thread up to 255 registers;
// without a minimum it kept 128 and spilled to local memory (ptxas -v, sm_90: 52-124 bytes of
// spill stores). One block of 256 threads an SM without spills against two with: untimed.
constexpr int kBlocksPerSm = 1;

// Samples the Z tile of the chunk's columns [column_begin, + kColumns), the input channels
// [channel_begin, + kChannels) of `group` and the scope cells [cell_begin, + kCells) into
// z_tile, zeros past their ends. Every thread of the block calls it; the caller's __syncthreads
// orders the reads after the writes.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>,
          typename Tile = ImplicitGemmTile<acc_t>>
__device__ void sample_z_tile(const ColumnView<scalar_t>& v, int64_t group, int64_t column_begin,
                              int64_t channel_begin, int64_t cell_begin,
                              typename Tile::ZTile& z_tile) {
  // Threads next to each other sample channels next to each other of the channels-last input.
  const int column = threadIdx.x / Tile::kChannels, channel = threadIdx.x % Tile::kChannels;
  const int64_t cell_end =
      cell_begin + Tile::kCells < v.cells ? cell_begin + Tile::kCells : v.cells;
  // The thread's entries of the tile, cells kChannels rows apart, are its sums.
  acc_t* sums = &z_tile[channel][column];
  constexpr int64_t kCellStride = Tile::kChannels * Tile::kColumns;
  for (int cell = 0; cell < Tile::kCells; ++cell) sums[cell * kCellStride] = 0;
  const int64_t local = column_begin + column, in_group = channel_begin + channel;
  if (local < v.count && in_group < v.group_channels) {
    add_scope_pass(v, v.column(local), v.channel(group * v.group_channels + in_group), cell_begin,
                   cell_end, sums, kCellStride);
  }
}

// out_rows (count, C_out) of the chunk's columns, without the bias; weight (C_out, C_in/groups,
// S_h, S_w) contiguous. Blocks stride over the tiles, column tiles first, then output channel
// tiles, then groups; every thread of a block takes the same tiles and steps, so all reach
// each __syncthreads.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock, kBlocksPerSm)
    forward_kernel(const __grid_constant__ ColumnView<scalar_t> v,
                                 const scalar_t* weight, int64_t out_channels,
                                 scalar_t* out_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  using Tile = ImplicitGemmTile<acc_t>;
  __shared__ typename Tile::ZTile z_tile;
  __shared__ acc_t w_tile[Tile::kDepth][Tile::kOutChannels];  // W'^T: (cell, channel) x out
  const int64_t groups = v.channels / v.group_channels, group_out = out_channels / groups;
  const int64_t column_tiles = tiles_of(v.count, Tile::kColumns);
  const int64_t out_tiles = tiles_of(group_out, Tile::kOutChannels);
  const int row = threadIdx.x / Tile::kThreadSide, col = threadIdx.x % Tile::kThreadSide;

  for (int64_t tile = blockIdx.x; tile < column_tiles * out_tiles * groups; tile += gridDim.x) {
    const int64_t column_begin = (tile % column_tiles) * Tile::kColumns;
    const int64_t out_begin = (tile / column_tiles % out_tiles) * Tile::kOutChannels;
    const int64_t group = tile / (column_tiles * out_tiles);
    acc_t sums[Tile::kColumnsPerThread][Tile::kOutPerThread] = {};
    for (int64_t channel_begin = 0; channel_begin < v.group_channels;
         channel_begin += Tile::kChannels) {
      for (int64_t cell_begin = 0; cell_begin < v.cells; cell_begin += Tile::kCells) {
        sample_z_tile(v, group, column_begin, channel_begin, cell_begin, z_tile);
        // W'[o, cell * C_in/g + c] = weight[o, c, cell]: consecutive threads read consecutive
        // cells.
        for (int index = threadIdx.x; index < Tile::kDepth * Tile::kOutChannels;
             index += kThreadsPerBlock) {
          const int cell = index % Tile::kCells, channel = index / Tile::kCells % Tile::kChannels;
          const int out = index / Tile::kDepth;
          const int64_t o = out_begin + out, c = channel_begin + channel, s = cell_begin + cell;
          w_tile[cell * Tile::kChannels + channel][out] =
              o < group_out && c < v.group_channels && s < v.cells
                  ? static_cast<acc_t>(
                        weight[((group * group_out + o) * v.group_channels + c) * v.cells + s])
                  : acc_t(0);
        }
        __syncthreads();
        for (int k = 0; k < Tile::kDepth; ++k) {
          acc_t z[Tile::kColumnsPerThread], w[Tile::kOutPerThread];
          for (int i = 0; i < Tile::kColumnsPerThread; ++i) {
            z[i] = z_tile[k][row + i * Tile::kThreadSide];
          }
          for (int j = 0; j < Tile::kOutPerThread; ++j) {
            w[j] = w_tile[k][col + j * Tile::kThreadSide];
          }
          for (int i = 0; i < Tile::kColumnsPerThread; ++i) {
            for (int j = 0; j < Tile::kOutPerThread; ++j) sums[i][j] += z[i] * w[j];
          }
        }
        __syncthreads();
      }
    }
    for (int i = 0; i < Tile::kColumnsPerThread; ++i) {
      const int64_t local = column_begin + row + i * Tile::kThreadSide;
      for (int j = 0; j < Tile::kOutPerThread; ++j) {
        const int64_t o = out_begin + col + j * Tile::kThreadSide;
        if (local < v.count && o < group_out) {
          out_rows[local * out_channels + group * group_out + o] =
              static_cast<scalar_t>(sums[i][j]);
        }
      }
    }
  }
}

// grad_partial (ranges, groups, S * C_in/groups, C_out/groups): range r's sum of Z[col, k] *
// gO[col, o] over the chunk's columns [r * range_columns, (r + 1) * range_columns), K ordered
// as in a row of Z (k = cell * C_in/groups + c); grad_out_rows (count, C_out) the chunk's rows
// of the output gradient. range_columns is a multiple of kColumns, so only the chunk's last
// step is cut short. Blocks stride over the tiles, cell tiles first, then input channel tiles,
// output channel tiles, groups and ranges; every thread of a block takes the same tiles and
// steps, so all reach each __syncthreads.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock, kBlocksPerSm)
    weight_grad_kernel(const __grid_constant__ ColumnView<scalar_t> v,
                                     const scalar_t* grad_out_rows, int64_t out_channels,
                                     int64_t range_columns, int64_t ranges,
                                     at::opmath_type<scalar_t>* grad_partial) {
  using acc_t = at::opmath_type<scalar_t>;
  using Tile = ImplicitGemmTile<acc_t>;
  __shared__ typename Tile::ZTile z_tile;
  __shared__ acc_t grad_out_tile[Tile::kColumns][Tile::kOutChannels];  // gO: column x out
  const int64_t groups = v.channels / v.group_channels, group_out = out_channels / groups;
  const int64_t cell_tiles = tiles_of(v.cells, Tile::kCells);
  const int64_t k_tiles = tiles_of(v.group_channels, Tile::kChannels) * cell_tiles;
  const int64_t out_tiles = tiles_of(group_out, Tile::kOutChannels);
  const int row = threadIdx.x / Tile::kThreadSide, col = threadIdx.x % Tile::kThreadSide;

  for (int64_t tile = blockIdx.x; tile < k_tiles * out_tiles * groups * ranges;
       tile += gridDim.x) {
    const int64_t cell_begin = (tile % cell_tiles) * Tile::kCells;
    const int64_t channel_begin = (tile % k_tiles / cell_tiles) * Tile::kChannels;
    const int64_t out_begin = (tile / k_tiles % out_tiles) * Tile::kOutChannels;
    const int64_t group = tile / (k_tiles * out_tiles) % groups;
    const int64_t range = tile / (k_tiles * out_tiles * groups);
    const int64_t range_end =
        (range + 1) * range_columns < v.count ? (range + 1) * range_columns : v.count;
    acc_t sums[Tile::kDepthPerThread][Tile::kOutPerThread] = {};
    for (int64_t column_begin = range * range_columns; column_begin < range_end;
         column_begin += Tile::kColumns) {
      sample_z_tile(v, group, column_begin, channel_begin, cell_begin, z_tile);
      // Consecutive threads read consecutive output channels of a row.
      for (int index = threadIdx.x; index < Tile::kColumns * Tile::kOutChannels;
           index += kThreadsPerBlock) {
        const int column = index / Tile::kOutChannels, out = index % Tile::kOutChannels;
        const int64_t local = column_begin + column, o = out_begin + out;
        grad_out_tile[column][out] =
            local < v.count && o < group_out
                ? static_cast<acc_t>(grad_out_rows[local * out_channels + group * group_out + o])
                : acc_t(0);
      }
      __syncthreads();
      for (int column = 0; column < Tile::kColumns; ++column) {
        acc_t z[Tile::kDepthPerThread], grad[Tile::kOutPerThread];
        for (int i = 0; i < Tile::kDepthPerThread; ++i) {
          z[i] = z_tile[row + i * Tile::kThreadSide][column];
        }
        for (int j = 0; j < Tile::kOutPerThread; ++j) {
          grad[j] = grad_out_tile[column][col + j * Tile::kThreadSide];
        }
        for (int i = 0; i < Tile::kDepthPerThread; ++i) {
          for (int j = 0; j < Tile::kOutPerThread; ++j) sums[i][j] += z[i] * grad[j];
        }
      }
      __syncthreads();
    }
    acc_t* range_sums = grad_partial + (range * groups + group) * v.cells * v.group_channels *
                                           group_out;
    for (int i = 0; i < Tile::kDepthPerThread; ++i) {
      const int entry = row + i * Tile::kThreadSide;
      const int64_t s = cell_begin + entry / Tile::kChannels;
      const int64_t c = channel_begin + entry % Tile::kChannels;
      for (int j = 0; j < Tile::kOutPerThread; ++j) {
        const int64_t o = out_begin + col + j * Tile::kThreadSide;
        if (s < v.cells && c < v.group_channels && o < group_out) {
          range_sums[(s * v.group_channels + c) * group_out + o] = sums[i][j];
        }
      }
    }
  }
}

inline void forward(const ColumnChunk& chunk, const Tensor& weight, Tensor& out_rows) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  TORCH_INTERNAL_ASSERT(weight.is_contiguous() && out_rows.is_contiguous(),
                        "implicit_gemm_forward: weight and out_rows must be contiguous");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out_rows.scalar_type(), "dk_ops_implicit_gemm_forward_cuda", [&] {
        using Tile = ImplicitGemmTile<at::opmath_type<scalar_t>>;
        const auto& g = chunk.g;
        const int64_t tiles = tiles_of(chunk.count, Tile::kColumns) *
                              tiles_of(g.out_channels / g.groups, Tile::kOutChannels) * g.groups;
        const ColumnView<scalar_t> view(chunk);
        DK_LAUNCH(forward_kernel<scalar_t>, std::clamp<int64_t>(tiles, 1, kMaxBlocks),
                  kThreadsPerBlock, stream)(view, weight.data_ptr<scalar_t>(), g.out_channels,
                                            out_rows.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

// The weight gradient's column ranges: as many as bring its blocks to about
// kWeightGradBlocks (a few waves of a large GPU's 100-150 SMs, untimed), but each at least
// kMinRangeSteps steps long, so that the partial sums a range writes, and the launcher reads
// back, stay small beside the gO it reads.
constexpr int64_t kWeightGradBlocks = 1024;
constexpr int64_t kMinRangeSteps = 4;

inline void weight_grad(const ColumnChunk& chunk, const Tensor& grad_out_rows,
                        Tensor& grad_weight_cols) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  TORCH_INTERNAL_ASSERT(grad_out_rows.is_contiguous() && grad_weight_cols.is_contiguous(),
                        "implicit_gemm_weight_grad: grad_out_rows and grad_weight_cols must be "
                        "contiguous");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_out_rows.scalar_type(),
      "dk_ops_implicit_gemm_weight_grad_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        using Tile = ImplicitGemmTile<acc_t>;
        TORCH_INTERNAL_ASSERT(
            grad_weight_cols.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
            "grad_weight_cols must be in the accumulation dtype");
        const auto& g = chunk.g;
        const int64_t group_channels = g.in_channels / g.groups;
        const int64_t group_out = g.out_channels / g.groups;
        const int64_t tiles = tiles_of(group_channels, Tile::kChannels) *
                              tiles_of(g.scope_cells(), Tile::kCells) *
                              tiles_of(group_out, Tile::kOutChannels) * g.groups;
        // The driver sends no chunk without input or output channels.
        TORCH_INTERNAL_ASSERT(tiles > 0, "implicit_gemm_weight_grad: a product of no tiles");
        const int64_t steps = tiles_of(chunk.count, Tile::kColumns);
        const int64_t wanted_ranges = std::max<int64_t>(1, kWeightGradBlocks / tiles);
        const int64_t range_steps =
            std::max(kMinRangeSteps, tiles_of(steps, wanted_ranges));
        const int64_t range_columns = range_steps * Tile::kColumns;
        const int64_t ranges = tiles_of(chunk.count, range_columns);
        // Every entry is written: each range has columns, and its blocks cover K and C_out.
        auto partial = at::empty({ranges, g.groups, g.scope_cells() * group_channels, group_out},
                                 grad_weight_cols.options());
        const ColumnView<scalar_t> view(chunk);
        DK_LAUNCH(weight_grad_kernel<scalar_t>,
                  std::clamp<int64_t>(tiles * ranges, 1, kMaxBlocks), kThreadsPerBlock, stream)(
            view, grad_out_rows.data_ptr<scalar_t>(), g.out_channels, range_columns, ranges,
            partial.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        grad_weight_cols.add_(partial.sum(0));  // ranges summed in a fixed order
      });
}

}  // namespace dk_ops::cuda_kernels::implicit_gemm
