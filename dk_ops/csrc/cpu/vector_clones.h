// DK_VECTOR_CLONES: a CPU loop compiled for x86-64-v3 (AVX2, FMA) as well as for the baseline
// x86-64 ISA; the loader picks the clone the CPU runs (GCC function multiversioning), so one
// build is fast on current CPUs and still runs on old ones. Everything such a function calls is
// inlined into the clone: its channel loops vectorise with FMA and floor() becomes one
// instruction.
#pragma once

// DK_WIDE_VECTOR_CLONES adds an x86-64-v4 (AVX-512) clone, for loops whose lanes each compute a
// long chain of arithmetic from contiguous loads: 16 lanes halve their work. It is not the
// default: the loops over short runs of channels, with gathers, ran 3-4x slower on it.
//
// The build switch DK_OPS_VECTOR_ISA (setup.py, `make test-isa`) compiles every such loop for
// one ISA instead, so that the tests also run the clones this CPU's loader does not pick.
#if defined(DK_VECTOR_ISA_X86_64_V3)
#define DK_VECTOR_CLONES __attribute__((target("arch=x86-64-v3")))
#define DK_WIDE_VECTOR_CLONES DK_VECTOR_CLONES
#elif defined(DK_VECTOR_ISA_X86_64) || !defined(__x86_64__) || !defined(__GNUC__) || \
    defined(__clang__)
#define DK_VECTOR_CLONES
#define DK_WIDE_VECTOR_CLONES
#else
#define DK_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define DK_WIDE_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
