#include "lowbit/thread_pool.h"

#include <algorithm>

namespace lowbit {

ThreadPool::ThreadPool(unsigned max_threads) : max_threads_(std::max(1u, max_threads)) {}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

unsigned ThreadPool::threads_for(size_t count, unsigned threads) const {
  unsigned want = threads == 0 ? max_threads_ : std::min(threads, max_threads_);
  if (count < want) want = unsigned(count);
  return std::max(1u, want);
}

void ThreadPool::start_workers_locked() {
  while (workers_.size() + 1 < max_threads_) {
    unsigned index = unsigned(workers_.size()) + 1;
    workers_.emplace_back([this, index] { worker_loop(index); });
  }
}

void ThreadPool::run_items(unsigned thread_index) {
  try {
    for (;;) {
      size_t item = next_.fetch_add(1, std::memory_order_relaxed);
      if (item >= count_) break;
      (*fn_)(item, thread_index);
    }
  } catch (...) {
    next_.store(count_, std::memory_order_relaxed);  // the others stop at their next item
    std::lock_guard<std::mutex> lock(state_mutex_);
    if (!error_) error_ = std::current_exception();
  }
}

void ThreadPool::worker_loop(unsigned worker_index) {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(state_mutex_);
      wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
      if (worker_index >= participants_) continue;
    }
    run_items(worker_index);
    {
      std::lock_guard<std::mutex> lock(state_mutex_);
      ++finished_;
    }
    done_.notify_one();
  }
}

void ThreadPool::parallel_for(size_t count, unsigned threads,
                              const std::function<void(size_t, unsigned)>& fn) {
  if (count == 0) return;
  if (threads_for(count, threads) == 1) {
    for (size_t i = 0; i < count; ++i) fn(i, 0);
    return;
  }
  // A caller arriving while another job has the workers runs its items itself rather than waiting (results do not
  // depend on the thread count, and a call on Node's main thread must not stall behind background work), asking
  // again after each item: once the workers are free they share what is left. parallel_for is never nested.
  std::unique_lock<std::mutex> job(job_mutex_, std::defer_lock);
  size_t first = 0;
  while (!job.try_lock()) {
    if (first == count) return;
    fn(first++, 0);
  }
  if (first == count) return;
  const unsigned participants = threads_for(count - first, threads);
  if (participants == 1) {
    for (size_t i = first; i < count; ++i) fn(i, 0);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    start_workers_locked();
    fn_ = &fn;
    count_ = count;
    next_.store(first, std::memory_order_relaxed);  // the items the caller ran alone are done
    participants_ = participants;
    finished_ = 0;
    error_ = nullptr;
    ++generation_;
  }
  wake_.notify_all();
  run_items(0);
  std::unique_lock<std::mutex> lock(state_mutex_);
  done_.wait(lock, [&] { return finished_ + 1 == participants_; });
  fn_ = nullptr;
  if (error_) {
    std::exception_ptr error = error_;
    error_ = nullptr;
    std::rethrow_exception(error);
  }
}

}  // namespace lowbit
