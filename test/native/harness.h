// Minimal test harness for the native kernel tests: prints one line per case
// ("ok <name>", "FAIL <name>: <why>", "skipped: <name>: <why>") and a closing
// "native: N passed, N failed, N skipped". test/ts/native.test.ts turns each
// line into a mocha test.
#pragma once

#include <cstdio>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace harness {

struct Case {
  std::string name;
  std::function<std::string()> run;  // returns "" on success, else the failure
  std::string skip_reason;           // non-empty: skipped with this reason
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

inline void add(std::string name, std::function<std::string()> run, std::string skip = "") {
  registry().push_back({std::move(name), std::move(run), std::move(skip)});
}

inline int run_all(const std::string& filter) {
  int passed = 0, failed = 0, skipped = 0;
  for (auto& c : registry()) {
    if (!filter.empty() && c.name.find(filter) == std::string::npos) continue;
    if (!c.skip_reason.empty()) {
      std::printf("skipped: %s: %s\n", c.name.c_str(), c.skip_reason.c_str());
      ++skipped;
      continue;
    }
    std::string why = c.run();
    if (why.empty()) {
      std::printf("ok %s\n", c.name.c_str());
      ++passed;
    } else {
      std::printf("FAIL %s: %s\n", c.name.c_str(), why.c_str());
      ++failed;
    }
    std::fflush(stdout);
  }
  std::printf("native: %d passed, %d failed, %d skipped\n", passed, failed, skipped);
  return failed == 0 ? 0 : 1;
}

template <class... T>
std::string str(const T&... parts) {
  std::ostringstream os;
  os.precision(9);
  (os << ... << parts);
  return os.str();
}

// Deterministic generator (xorshift64*), seeded per case.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 2685821657736338717ull;
  }
  double uniform() { return double(next() >> 11) * (1.0 / 9007199254740992.0); }
  float range(float lo, float hi) { return float(lo + (hi - lo) * uniform()); }
  int integer(int lo, int hi) { return lo + int(next() % uint64_t(hi - lo + 1)); }
};

}  // namespace harness
