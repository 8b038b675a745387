// A process-wide cache of read-only tables that are expensive to build and the same from call to call (the
// CPU forward's sinusoid rows): thread-safe, bounded in bytes, least recently used first out.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <list>
#include <mutex>
#include <string>

namespace embedfast {

class TableCache {
 public:
  explicit TableCache(int64_t budget_bytes) : budget_bytes_(budget_bytes) {}

  // A table of at least `rows` rows for `key`: the cached one, or build(n) for some n >= rows (twice the cached
  // rows when growing, so that a table grown one row per call is rebuilt rarely), then cached. An undefined
  // tensor when `rows` rows of `row_bytes` would not fit the budget. Callers must not write to the table.
  at::Tensor get(const std::string& key, int64_t rows, int64_t row_bytes, const std::function<at::Tensor(int64_t)>& build) {
    if (row_bytes <= 0 || rows > budget_bytes_ / row_bytes) return {};
    int64_t cached_rows = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto entry = entries_.begin(); entry != entries_.end(); ++entry) {
        if (entry->key != key) continue;
        cached_rows = entry->table.size(0);
        if (cached_rows >= rows) {
          entries_.splice(entries_.begin(), entries_, entry);
          return entry->table;
        }
      }
    }
    const int64_t grown = std::max(rows, 2 * cached_rows);
    at::Tensor table = build(grown <= budget_bytes_ / row_bytes ? grown : rows);  // outside the lock: may take ms
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.remove_if([&](const Entry& entry) { return entry.key == key; });
    entries_.push_front({key, table});
    int64_t total = 0;  // keep the most recently used tables that fit
    for (auto entry = entries_.begin(); entry != entries_.end();) {
      const int64_t bytes = static_cast<int64_t>(entry->table.nbytes());
      if (entry != entries_.begin() && total + bytes > budget_bytes_) {
        entry = entries_.erase(entry);
      } else {
        total += bytes;
        ++entry;
      }
    }
    return table;
  }

 private:
  struct Entry {
    std::string key;
    at::Tensor table;
  };
  const int64_t budget_bytes_;
  std::mutex mutex_;
  std::list<Entry> entries_;  // most recently used first
};

}  // namespace embedfast
