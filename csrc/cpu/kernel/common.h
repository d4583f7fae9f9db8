// Small helpers of the CPU kernel: min/max/round_up, per-thread Scratch memory, the
// interrupt poll and a cache prefetch.
// Part of the CPU kernel compiled once per instruction set (see attention_cpu_isa.cpp):
// include only from there, inside namespace mha::MHA_CPU_NS, no STL templates.
#pragma once

#include "cpu/kernel/config.h"

namespace mha {
namespace MHA_CPU_NS {

// ------------------------------------------------------------------------------------------
// Small helpers (no STL templates: see config.h).

template <typename T>
inline T min_of(T a, T b) {
    return a < b ? a : b;
}
template <typename T>
inline T max_of(T a, T b) {
    return a < b ? b : a;
}
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Scratch memory owned by one thread: one aligned block, carved into buffers. Constructing
// it never throws (it may live inside an OpenMP region): check ok() before carving.
class Scratch {
   public:
    // Zero bytes allocate nothing (a tiny call makes no malloc/free pair for an unused block).
    explicit Scratch(int64_t bytes) {
        bytes_ = round_up(bytes > 0 ? bytes : 0, 64);
        if (bytes_ > 0) {
            data_ = static_cast<char*>(std::aligned_alloc(64, static_cast<size_t>(bytes_)));
        }
    }
    bool ok() const { return bytes_ == 0 || data_ != nullptr; }
    ~Scratch() { std::free(data_); }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    // Next buffer of n elements of type U, 64-byte aligned. Asking for more than was
    // reserved is a sizing bug: fail loudly rather than overrun the heap.
    template <typename U>
    U* take(int64_t n) {
        U* p = reinterpret_cast<U*>(data_ + used_);
        used_ += round_up(n * static_cast<int64_t>(sizeof(U)), 64);
        if (used_ > bytes_) throw_bad_alloc(used_);
        return p;
    }

    // Hand out the whole block again from the start.
    void reset() { used_ = 0; }

    // Bytes to reserve for buffers of these element counts of type U.
    template <typename U>
    static int64_t bytes_for(std::initializer_list<int64_t> counts) {
        int64_t n = 0;
        for (int64_t c : counts) n += round_up(c * static_cast<int64_t>(sizeof(U)), 64);
        return n;
    }

   private:
    char* data_ = nullptr;
    int64_t bytes_ = 0;
    int64_t used_ = 0;
};

// Marks a per-thread cache as in use for its lifetime (when `claim` is true), exceptions too.
class CacheClaim {
   public:
    CacheClaim(bool* busy, bool claim) : busy_(claim ? busy : nullptr) {
        if (busy_ != nullptr) *busy_ = true;
    }
    ~CacheClaim() {
        if (busy_ != nullptr) *busy_ = false;
    }
    CacheClaim(const CacheClaim&) = delete;
    CacheClaim& operator=(const CacheClaim&) = delete;

   private:
    bool* busy_;
};

// The calling thread (OpenMP thread 0) asks the interrupt hook whether to stop.
inline void poll_interrupt(const AttentionParams& p, int* stop) {
#ifdef _OPENMP
    if (omp_get_thread_num() != 0) return;
#endif
    if (p.interrupt_check != nullptr && p.interrupt_check(p.interrupt_ctx) != 0) {
#pragma omp atomic write
        *stop = 1;
    }
}

// Prefetch the cache lines of [ptr, ptr + bytes) (never faults, even past an array's end).
inline void prefetch_row(const void* ptr, int64_t bytes) {
    const char* c = static_cast<const char*>(ptr);
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

}  // namespace MHA_CPU_NS
}  // namespace mha
