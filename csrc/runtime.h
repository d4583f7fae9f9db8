// Guards around the OpenMP runtime: how many threads a native call may use, and fork safety.
// dispatch.cpp calls resolve_threads() before every CPU kernel; nothing else needs this header.
#pragma once

namespace mha {

// The team size a CPU call may use when it asked for `requested` threads (<= 0: the OpenMP
// default, omp_get_max_threads() of the calling thread). Returns `requested` unchanged when
// that team can run, so the kernels keep their own choices for the default (0); otherwise the
// smaller count to use instead:
//  - clamp: at most thread_limit() threads (4 per CPU this machine has online);
//  - probe: the first time a calling thread needs a larger team than before, the missing
//    threads are created (with the OpenMP runtime's stack size) and joined again; if only m of
//    them can be made (ulimit -v, RLIMIT_NPROC), this thread's calls run with the m threads
//    that can exist from then on, instead of libgomp calling exit(1) ("Thread creation
//    failed") in the middle of a call.
// The first call also installs the fork handler (see runtime.cpp). Without OpenMP it returns
// `requested` (nothing ever starts a thread).
int resolve_threads(int requested);

// The clamp above: 4 x std::thread::hardware_concurrency(), at least 4.
int thread_limit();

}  // namespace mha
