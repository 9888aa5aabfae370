// Implicit-GEMM forward of the local path: out = Z @ W'^T per group, as the driver computes it
// from the scope columns, but without Z in global memory. Opt-in (DK_OPS_LOCAL_FORWARD=
// implicit_gemm, see the driver) until a GPU times it against the columns path (docs/gpu.md):
// that path writes Z, S * C_in values a column, and the GEMM reads it back, the memory traffic
// that this kernel saves; it pays for it by sampling each Z tile once per tile of output
// channels instead of once.
//
// A block owns a tile of kColumns columns x kOutChannels output channels of one group and runs
// over the group's K = S * C_in/groups in steps of kChannels input channels x kCells scope
// cells (any order of K gives the same sum), each step:
//   1. the Z tile, (kCells x kChannels) x kColumns, sampled into shared memory: each thread
//      owns one (column, channel) and sums its cells of the step with add_scope_pass, the
//      scope-column kernel's own math;
//   2. the W' tile, (kCells x kChannels) x kOutChannels, read from the weight into shared
//      memory;
//   3. __syncthreads, then each thread adds the products of its 4 x 4 outputs (a sub-tile
//      strided over the block's 16 x 16 threads) over the step's K, from registers;
//   4. __syncthreads, before the next step overwrites the tiles.
// Entries past the end of the columns, output channels, input channels or scope cells are
// zeros in both tiles, so every tail is an ordinary step. Sums and the shared tiles are in
// acc_t (float32 for half and bfloat16: Z is never rounded to them, unlike the columns path).
// Plain CUDA-core FMAs: the next step, once it can be timed, is a tensor-core (mma) version
// with the tiles in the operands' dtype.
//
// Included by deform_kernel_conv2d_cuda.cu inside its namespace, after ColumnView and
// add_scope_pass, which it reuses; a file of its own so that the opt-in kernel stays apart
// from the kernels of the default path.

// The tile of one block. kColumns * kChannels = kThreadsPerBlock: one (column, channel) to
// sample per thread and step. kCells: the two tiles of kDepth x 64 acc_t take 32 KiB of the
// 48 KiB of static shared memory, so a double step covers half the cells of a float one.
template <typename acc_t>
struct ImplicitGemmTile {
  static constexpr int kColumns = 64;
  static constexpr int kOutChannels = 64;
  static constexpr int kChannels = kThreadsPerBlock / kColumns;
  static constexpr int kCells = sizeof(acc_t) > 4 ? 8 : 16;
  static constexpr int kDepth = kCells * kChannels;
  // The threads as a kThreadSide x kThreadSide grid over the output tile; thread (row, col)
  // owns rows row + i * kThreadSide and output channels col + j * kThreadSide.
  static constexpr int kThreadSide = 16;
  static constexpr int kRowsPerThread = kColumns / kThreadSide;
  static constexpr int kOutPerThread = kOutChannels / kThreadSide;
  static_assert(kColumns * kChannels == kThreadsPerBlock &&
                kThreadSide * kThreadSide == kThreadsPerBlock);
};

// out_rows (count, C_out) of the chunk's columns, without the bias; weight (C_out, C_in/groups,
// S_h, S_w) contiguous. Blocks stride over the tiles, column tiles first, then output channel
// tiles, then groups; every thread of a block takes the same tiles and steps, so all reach
// each __syncthreads.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    implicit_gemm_forward_kernel(const __grid_constant__ ColumnView<scalar_t> v,
                                 const scalar_t* weight, int64_t out_channels,
                                 scalar_t* out_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  using Tile = ImplicitGemmTile<acc_t>;
  __shared__ acc_t z_tile[Tile::kDepth][Tile::kColumns];      // Z^T: (cell, channel) x column
  __shared__ acc_t w_tile[Tile::kDepth][Tile::kOutChannels];  // W'^T: (cell, channel) x out
  const int64_t groups = v.channels / v.group_channels, group_out = out_channels / groups;
  const int64_t column_tiles = (v.count + Tile::kColumns - 1) / Tile::kColumns;
  const int64_t out_tiles = (group_out + Tile::kOutChannels - 1) / Tile::kOutChannels;
  // Threads next to each other sample channels next to each other of the channels-last input.
  const int sample_column = threadIdx.x / Tile::kChannels;
  const int sample_channel = threadIdx.x % Tile::kChannels;
  const int row = threadIdx.x / Tile::kThreadSide, col = threadIdx.x % Tile::kThreadSide;

  for (int64_t tile = blockIdx.x; tile < column_tiles * out_tiles * groups; tile += gridDim.x) {
    const int64_t column_begin = (tile % column_tiles) * Tile::kColumns;
    const int64_t out_begin = (tile / column_tiles % out_tiles) * Tile::kOutChannels;
    const int64_t group = tile / (column_tiles * out_tiles);
    acc_t sums[Tile::kRowsPerThread][Tile::kOutPerThread] = {};
    for (int64_t channel_begin = 0; channel_begin < v.group_channels;
         channel_begin += Tile::kChannels) {
      for (int64_t cell_begin = 0; cell_begin < v.cells; cell_begin += Tile::kCells) {
        const int64_t cell_end =
            cell_begin + Tile::kCells < v.cells ? cell_begin + Tile::kCells : v.cells;
        acc_t cells[Tile::kCells] = {};
        const int64_t local = column_begin + sample_column;
        const int64_t in_group = channel_begin + sample_channel;
        if (local < v.count && in_group < v.group_channels) {
          add_scope_pass(v, v.column(local), v.channel(group * v.group_channels + in_group),
                         cell_begin, cell_end, cells);
        }
        for (int cell = 0; cell < Tile::kCells; ++cell) {
          z_tile[cell * Tile::kChannels + sample_channel][sample_column] = cells[cell];
        }
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
          acc_t z[Tile::kRowsPerThread], w[Tile::kOutPerThread];
          for (int i = 0; i < Tile::kRowsPerThread; ++i) {
            z[i] = z_tile[k][row + i * Tile::kThreadSide];
          }
          for (int j = 0; j < Tile::kOutPerThread; ++j) {
            w[j] = w_tile[k][col + j * Tile::kThreadSide];
          }
          for (int i = 0; i < Tile::kRowsPerThread; ++i) {
            for (int j = 0; j < Tile::kOutPerThread; ++j) sums[i][j] += z[i] * w[j];
          }
        }
        __syncthreads();
      }
    }
    for (int i = 0; i < Tile::kRowsPerThread; ++i) {
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

void implicit_gemm_forward(const ColumnChunk& chunk, const Tensor& weight, Tensor& out_rows) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  TORCH_INTERNAL_ASSERT(weight.is_contiguous() && out_rows.is_contiguous(),
                        "implicit_gemm_forward: weight and out_rows must be contiguous");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out_rows.scalar_type(), "dk_ops_implicit_gemm_forward_cuda", [&] {
        using Tile = ImplicitGemmTile<at::opmath_type<scalar_t>>;
        const auto& g = chunk.g;
        const int64_t tiles = (chunk.count + Tile::kColumns - 1) / Tile::kColumns *
                              ((g.out_channels / g.groups + Tile::kOutChannels - 1) /
                               Tile::kOutChannels) *
                              g.groups;
        const ColumnView<scalar_t> view(chunk);
        DK_LAUNCH(implicit_gemm_forward_kernel<scalar_t>, std::clamp<int64_t>(tiles, 1, kMaxBlocks),
                  kThreadsPerBlock, stream)(view, weight.data_ptr<scalar_t>(), g.out_channels,
                                            out_rows.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}
