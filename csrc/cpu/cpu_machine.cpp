#include "cpu_machine.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <string>

namespace embedfast {
namespace {

bool can_run(CpuIsa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (isa) {
    case CpuIsa::kPortable:
      return true;
    case CpuIsa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case CpuIsa::kAvx512:
      return can_run(CpuIsa::kAvx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case CpuIsa::kAvx512Bf16:
      return can_run(CpuIsa::kAvx512) && __builtin_cpu_supports("avx512bf16");
  }
  return false;
#else
  return isa == CpuIsa::kPortable;
#endif
}

std::string runnable_names() {
  std::string names;
  for (CpuIsa isa : runnable_cpu_isas()) names += (names.empty() ? "" : ", ") + cpu_isa_name(isa);
  return names;
}

CpuIsa choose_isa() {
  const std::vector<CpuIsa> runnable = runnable_cpu_isas();
  const char* forced = std::getenv("EMBEDFAST_CPU_ISA");
  if (forced == nullptr || *forced == '\0' || std::string(forced) == "auto") return runnable.back();
  for (const detail::Choice& choice : detail::kCpuIsas) {
    if (detail::choice_name(choice) != forced) continue;
    const auto isa = static_cast<CpuIsa>(choice.value);
    TORCH_CHECK_VALUE(can_run(isa), "EMBEDFAST_CPU_ISA=", forced, ", but this CPU can run only: ", runnable_names());
    return isa;
  }
  TORCH_CHECK_VALUE(false, "EMBEDFAST_CPU_ISA must be auto or one of ", runnable_names(), " (what this CPU can run), got ",
                    forced);
}

// "48K", "2048K", "32M" in sysfs
int64_t parse_size(const std::string& text) {
  const int64_t value = std::atoll(text.c_str());
  if (text.find('M') != std::string::npos) return value << 20;
  if (text.find('K') != std::string::npos) return value << 10;
  return value;
}

// Linux's sysfs for cpu0, else glibc's sysconf, else the smallest caches seen on these machines.
CacheSizes find_cache_sizes() {
  CacheSizes sizes{0, 0, 0};
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), type_file(dir + "type"), size_file(dir + "size");
    int level = 0;
    std::string type, size;
    if (!(level_file >> level) || !(type_file >> type) || !(size_file >> size)) break;
    if (type == "Instruction") continue;
    int64_t& slot = level == 1 ? sizes.l1d : level == 2 ? sizes.l2 : sizes.l3;
    slot = std::max(slot, parse_size(size));
  }
#ifdef _SC_LEVEL1_DCACHE_SIZE
  if (sizes.l1d <= 0) sizes.l1d = sysconf(_SC_LEVEL1_DCACHE_SIZE);
  if (sizes.l2 <= 0) sizes.l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (sizes.l3 <= 0) sizes.l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
  if (sizes.l1d <= 0) sizes.l1d = int64_t{32} << 10;
  if (sizes.l2 <= 0) sizes.l2 = int64_t{512} << 10;
  if (sizes.l3 <= 0) sizes.l3 = int64_t{8} << 20;
  return sizes;
}

}  // namespace

std::vector<CpuIsa> runnable_cpu_isas() {
  std::vector<CpuIsa> isas;
  for (const detail::Choice& choice : detail::kCpuIsas) {
    if (can_run(static_cast<CpuIsa>(choice.value))) isas.push_back(static_cast<CpuIsa>(choice.value));
  }
  return isas;
}

std::string cpu_isa_name(CpuIsa isa) {
  for (const detail::Choice& choice : detail::kCpuIsas) {
    if (choice.value == static_cast<int64_t>(isa)) return detail::choice_name(choice);
  }
  return "unknown";
}

CpuIsa cpu_isa() {
  static const CpuIsa isa = choose_isa();  // an exception here is raised again by the next call
  return isa;
}

const CacheSizes& cache_sizes() {
  static const CacheSizes sizes = find_cache_sizes();
  return sizes;
}

int64_t stream_min_bytes() { return cache_sizes().l3 / 4; }

namespace {

// (chosen path, the paths this CPU can run lowest first, [L1d, L2, L3] bytes)
std::tuple<std::string, std::vector<std::string>, std::vector<int64_t>> cpu_info() {
  std::vector<std::string> runnable;
  for (CpuIsa isa : runnable_cpu_isas()) runnable.push_back(cpu_isa_name(isa));
  const CacheSizes& sizes = cache_sizes();
  return {cpu_isa_name(cpu_isa()), runnable, {sizes.l1d, sizes.l2, sizes.l3}};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(embedfast, m) {
  m.def("cpu_info() -> (str, str[], int[])", &cpu_info);
}

}  // namespace embedfast
