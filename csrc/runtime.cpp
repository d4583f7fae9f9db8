// OpenMP runtime guards (see runtime.h): the thread-count clamp and probe, and the fork handler.
//
// Fork: libgomp keeps a pool of worker threads per thread that opened a parallel region. A
// child made with fork() has only the forking thread, but inherits its pool's bookkeeping, so
// its first parallel region waits forever for workers that do not exist. A pthread_atfork
// "prepare" handler hands the forking thread's pool back first with
// omp_pause_resource_all(omp_pause_hard) (OpenMP 5.0; libgomp >= 9 frees the calling thread's
// pool: its workers exit and the next region starts a fresh team), so the child -- and the
// parent's next call, at the price of starting its threads again -- builds a new pool. Pools of
// other threads of the parent do not matter: those threads do not exist in the child. The
// function is looked up at run time in whichever libgomp this module is bound to (PyTorch's
// copy when torch was imported first), so an old runtime without it still loads; forking then
// stays unsafe, as before.
#include "runtime.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <dlfcn.h>
#include <omp.h>
#include <pthread.h>
#endif

namespace mha {

int thread_limit() {
    static const int limit = [] {
        const unsigned cpus = std::thread::hardware_concurrency();
        return static_cast<int>(std::max(4u, 4u * (cpus > 0 ? cpus : 1u)));
    }();
    return limit;
}

#ifndef _OPENMP

int resolve_threads(int requested) { return requested; }

#else

namespace {

// Threads of the calling thread's pool known to be creatable (the team size that ran or was
// probed), and the most it can have when a probe fell short (0: no cap found).
thread_local int t_ready = 1;
thread_local int t_cap = 0;

using PauseFn = int (*)(int);
std::atomic<PauseFn> g_pause{nullptr};
// Set in a child whose parent could not hand its pool back before fork(): every call of the
// child then runs on its own thread (serial, but it finishes).
std::atomic<bool> g_serial{false};
thread_local bool t_paused = false;

// omp_pause_resource_all of the libgomp that omp_get_max_threads() resolved to.
PauseFn find_pause() {
    Dl_info info{};
    if (dladdr(reinterpret_cast<void*>(&omp_get_max_threads), &info) == 0 ||
        info.dli_fname == nullptr) {
        return nullptr;
    }
    void* lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (lib == nullptr) return nullptr;
    void* fn = dlsym(lib, "omp_pause_resource_all");
    dlclose(lib);  // RTLD_NOLOAD took a reference to a library that stays loaded
    return reinterpret_cast<PauseFn>(fn);
}

void before_fork() {
    const PauseFn pause = g_pause.load(std::memory_order_relaxed);
    // Only between parallel regions (a fork from inside one cannot be helped: -1).
    t_paused = pause != nullptr && omp_in_parallel() == 0 && pause(/*omp_pause_hard=*/2) == 0;
    if (t_paused) t_ready = 1;  // this thread's pool is gone: in the parent and in the child
}

void after_fork_child() {
    if (!t_paused) g_serial.store(true, std::memory_order_relaxed);
}

void install_fork_handler() {
    g_pause.store(find_pause(), std::memory_order_relaxed);
    pthread_atfork(before_fork, nullptr, after_fork_child);
}

// The stack size libgomp gives its threads: OMP_STACKSIZE / GOMP_STACKSIZE ("<n>[B|K|M|G]",
// kilobytes without a suffix), else the pthread default.
size_t omp_stack_size() {
    for (const char* name : {"OMP_STACKSIZE", "GOMP_STACKSIZE"}) {
        const char* s = std::getenv(name);
        if (s == nullptr) continue;
        char* end = nullptr;
        const unsigned long long n = std::strtoull(s, &end, 10);
        if (end == s) continue;
        while (std::isspace(static_cast<unsigned char>(*end))) ++end;
        unsigned long long unit = 1024;
        switch (std::toupper(static_cast<unsigned char>(*end))) {
            case 'B': unit = 1; break;
            case 'M': unit = 1024ull * 1024; break;
            case 'G': unit = 1024ull * 1024 * 1024; break;
            default: break;
        }
        return static_cast<size_t>(n * unit);
    }
    return 0;
}

struct Gate {
    pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
    bool open = false;
};

void* wait_at_gate(void* arg) {
    Gate* gate = static_cast<Gate*>(arg);
    pthread_mutex_lock(&gate->mutex);
    while (!gate->open) pthread_cond_wait(&gate->cond, &gate->mutex);
    pthread_mutex_unlock(&gate->mutex);
    return nullptr;
}

// Creates up to `n` threads that all live at once, then lets them exit and joins them.
// Returns how many could be created.
int probe_threads(int n) {
    pthread_attr_t attr;
    if (pthread_attr_init(&attr) != 0) return 0;
    const size_t stack = omp_stack_size();
    if (stack > 0) pthread_attr_setstacksize(&attr, stack);
    Gate gate;
    std::vector<pthread_t> made;
    try {
        made.reserve(static_cast<size_t>(n));
    } catch (const std::bad_alloc&) {
        pthread_attr_destroy(&attr);
        return 0;
    }
    for (int i = 0; i < n; ++i) {
        pthread_t t;
        if (pthread_create(&t, &attr, wait_at_gate, &gate) != 0) break;
        made.push_back(t);
    }
    pthread_attr_destroy(&attr);
    pthread_mutex_lock(&gate.mutex);
    gate.open = true;
    pthread_cond_broadcast(&gate.cond);
    pthread_mutex_unlock(&gate.mutex);
    for (pthread_t t : made) pthread_join(t, nullptr);
    return static_cast<int>(made.size());
}

}  // namespace

int resolve_threads(int requested) {
    static std::once_flag once;
    std::call_once(once, install_fork_handler);
    if (g_serial.load(std::memory_order_relaxed)) return 1;
    int result = requested;
    int team = requested > 0 ? requested : omp_get_max_threads();
    if (team > thread_limit()) result = team = thread_limit();
    if (t_cap > 0 && team > t_cap) result = team = t_cap;
    if (team <= t_ready) return result;
    // The pool has t_ready - 1 workers; the team needs team - 1.
    const int missing = team - t_ready;
    const int made = probe_threads(missing);
    if (made < missing) {
        t_cap = t_ready + made;
        result = team = t_cap;
    }
    t_ready = team;
    return result;
}

#endif  // _OPENMP

}  // namespace mha
