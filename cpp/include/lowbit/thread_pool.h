// A persistent pool of worker threads owned by a Context (never a process
// global). parallel_for hands out item indices dynamically; the calling thread
// takes part as thread 0. One job has the workers at a time: a caller arriving
// meanwhile runs its items on its own thread (as thread 0) instead of waiting,
// until the workers are free; then they share the items left.
// Work is split so that results never depend on the number of threads: each
// item's result is computed by exactly one thread in a fixed order.
#pragma once

#include <atomic>
#include <condition_variable>
#include <exception>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace lowbit {

class ThreadPool {
 public:
  // `max_threads` counts the caller; workers (max_threads - 1) start lazily.
  explicit ThreadPool(unsigned max_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  unsigned max_threads() const { return max_threads_; }

  // Calls fn(item, thread_index) for every item in [0, count) using at most
  // `threads` threads (0 = all). thread_index < the returned participant count,
  // which is also what callers size per-thread scratch by: use threads_for().
  // An exception thrown by fn (for example std::bad_alloc) stops the remaining
  // items and is rethrown here, in the caller, once every thread has stopped.
  void parallel_for(size_t count, unsigned threads,
                    const std::function<void(size_t item, unsigned thread_index)>& fn);

  // Number of threads parallel_for(count, threads, ...) will use.
  unsigned threads_for(size_t count, unsigned threads) const;

 private:
  void start_workers_locked();
  void worker_loop(unsigned worker_index);
  void run_items(unsigned thread_index);

  const unsigned max_threads_;
  std::mutex job_mutex_;  // one job at a time
  std::mutex state_mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::vector<std::thread> workers_;
  bool stopping_ = false;
  // Current job (guarded by state_mutex_ for publication).
  uint64_t generation_ = 0;
  unsigned participants_ = 0;
  unsigned finished_ = 0;
  size_t count_ = 0;
  std::atomic<size_t> next_{0};
  const std::function<void(size_t, unsigned)>* fn_ = nullptr;
  std::exception_ptr error_;  // the first exception of the current job (guarded by state_mutex_)
};

}  // namespace lowbit
