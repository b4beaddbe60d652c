// The kernels' threads: how many, and a small persistent pool that runs one job on all of them.
#pragma once
#include "common.h"

namespace {

// Threads = the CPUs this process may run on (its affinity mask, which taskset / cpusets narrow), unless
// BAICHUAN_KERNEL_THREADS says otherwise. OMP_NUM_THREADS is no guide: importing mindspore sets it to 1.
int kernel_threads() {
  static int n = [] {
    const char *v = getenv("BAICHUAN_KERNEL_THREADS");
    if (v && atoi(v) > 0) return atoi(v);
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
    return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }();
  return n;
}

// A small persistent pool rather than OpenMP. libgomp's idle threads spin after every parallel region, and on a
// 2-core machine they took the cores MindSpore's own threads needed between our calls (measured: a decode step
// 20-30x slower). These workers spin only briefly (kSpinMicros) for the next job, then block on a condition
// variable; the caller waits for them the same way. A decode step calls the kernels every few tens of microseconds,
// and waking a blocked thread costs about as much as a small projection: with blocking only, a 2-thread step of the
// 58M shape S took 8.6 ms against 5.9 ms on one thread (measured).
// parallel(nt, fn) runs fn(t, nt) for t = 0..nt-1 (t = 0 on the calling thread) and returns when all are done.
constexpr int64_t kSpinMicros = 100;

// Spins (with pause) while `busy()` holds, up to kSpinMicros; true when it stopped holding in that time.
template <class Busy>
bool spin_while(Busy busy) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
  for (int i = 0;; ++i) {
    if (!busy()) return true;
    _mm_pause();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) return false;
  }
}

class Pool {
 public:
  void run(int nt, const std::function<void(int, int)> &fn) {
    std::lock_guard<std::mutex> one_job(job_mu_);  // MindSpore may launch kernels from several threads
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &fn;
      nt_ = nt;
      // a new worker first takes mu_ after this job is posted, so it starts with it
      while (static_cast<int>(workers_) < nt - 1) std::thread(&Pool::work, this, ++workers_).detach();
      pending_.store(static_cast<int>(workers_));
      generation_.fetch_add(1);  // under mu_: a worker about to block re-checks it there
    }
    wake_.notify_all();
    fn(0, nt);
    if (spin_while([this] { return pending_.load() != 0; })) return;
    std::unique_lock<std::mutex> lk(mu_);
    done_.wait(lk, [this] { return pending_.load() == 0; });
  }

 private:
  void work(int id) {
    uint64_t seen;
    {
      std::lock_guard<std::mutex> lk(mu_);
      seen = generation_.load() - 1;  // started inside run(): the job posted there is ours too
    }
    for (;;) {
      if (!spin_while([&] { return generation_.load() == seen; })) {
        std::unique_lock<std::mutex> lk(mu_);
        wake_.wait(lk, [&] { return generation_.load() != seen; });
      }
      const std::function<void(int, int)> *fn;
      int nt;
      {
        std::lock_guard<std::mutex> lk(mu_);
        seen = generation_.load();
        fn = job_;
        nt = nt_;
      }
      if (id < nt) (*fn)(id, nt);
      if (pending_.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lk(mu_);  // the caller checks pending_ under mu_ before it blocks
        done_.notify_one();
      }
    }
  }
  std::mutex job_mu_, mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int, int)> *job_ = nullptr;
  int nt_ = 0;
  std::atomic<int> pending_{0};
  unsigned workers_ = 0;
  std::atomic<uint64_t> generation_{1};
};

void parallel(int nt, const std::function<void(int, int)> &fn) {
  if (nt <= 1) {
    fn(0, 1);
    return;
  }
  static Pool *pool = new Pool;  // never destroyed: its detached workers outlive static destructors
  pool->run(nt, fn);
}

}  // namespace
