// Runs a kernel call off the main thread and settles a Promise.
// Everything the work needs is unpacked on the main thread first; Execute()
// touches no N-API, and the JS arrays it reads or writes stay referenced
// until the Promise settles.
#pragma once

#include <napi.h>

#include <exception>
#include <functional>
#include <vector>

namespace lowbit_binding {

class AsyncTask : public Napi::AsyncWorker {
 public:
  // `work` returns a number for the Promise (for example a NaN index).
  static Napi::Promise Start(Napi::Env env, const std::vector<Napi::Value>& keep_alive,
                             std::function<double()> work) {
    auto* task = new AsyncTask(env, keep_alive, std::move(work));
    Napi::Promise promise = task->deferred_.Promise();
    task->Queue();
    return promise;
  }

 private:
  AsyncTask(Napi::Env env, const std::vector<Napi::Value>& keep_alive, std::function<double()> work)
      : Napi::AsyncWorker(env, "lowbit"), deferred_(Napi::Promise::Deferred::New(env)), work_(std::move(work)) {
    for (const auto& v : keep_alive) refs_.push_back(Napi::Persistent(v));
  }

  void Execute() override {
    try {
      result_ = work_();
    } catch (const std::exception& e) {
      SetError(std::string("lowbit native worker failed: ") + e.what());
    }
  }
  void OnOK() override { deferred_.Resolve(Napi::Number::New(Env(), result_)); }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

  Napi::Promise::Deferred deferred_;
  std::function<double()> work_;
  std::vector<Napi::Reference<Napi::Value>> refs_;
  double result_ = 0;
};

}  // namespace lowbit_binding
