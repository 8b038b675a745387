// What the CPU kernels know of the machine they run on, found once per process: the instruction-set path of
// the row loops (spec.CpuIsa; the environment variable EMBEDFAST_CPU_ISA forces a lower one) and the cache
// sizes, whence the store and prefetch policy.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "embedfast/spec.h"

namespace embedfast {

struct CacheSizes {
  int64_t l1d, l2, l3;  // bytes: L1 data and L2 per core, L3 in all
};

// The path the row loops take: the best one this CPU can run, or the one EMBEDFAST_CPU_ISA names (an error
// naming the variable when the CPU cannot run it).
CpuIsa cpu_isa();
// The paths this CPU can run, lowest first.
std::vector<CpuIsa> runnable_cpu_isas();
std::string cpu_isa_name(CpuIsa isa);
const CacheSizes& cache_sizes();

// Outputs of at least this many bytes (a quarter of the L3) are written around the caches (non-temporal
// stores): an output that size is evicted from the shared L3 before the next operator reads it, and ordinary
// stores would first read every line (a third more memory traffic in the forward) and evict the rows reused.
int64_t stream_min_bytes();

}  // namespace embedfast
