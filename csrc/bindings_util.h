// Argument parsing shared by the binding files (bindings.cpp, bindings_nn.cpp): include from
// those only (it needs pybind11).
#pragma once

#include <pybind11/pybind11.h>

#include <climits>
#include <cstdint>

#include "check.h"
#include "params.h"

namespace mha {
namespace binding {

// num_threads: None -> 0 (the OpenMP default), an int -> itself (bools refused). The range is
// the core's check (kMaxThreads); only an explicit 0 (which would read as the default) and
// values outside the C int range are refused here, with the same wording.
inline int parse_num_threads(const pybind11::handle& num_threads) {
    if (num_threads.is_none()) return 0;
    MHA_CHECK_TYPE(!PyBool_Check(num_threads.ptr()), "num_threads: expected an int or None, got ",
                   num_threads.ptr() == Py_True ? "True" : "False");
    int64_t n;
    try {
        n = num_threads.cast<int64_t>();
    } catch (const pybind11::cast_error&) {
        throw type_error("num_threads: expected an int or None");
    }
    MHA_CHECK(n != 0 && n >= INT_MIN && n <= INT_MAX, "num_threads: " MHA_NUM_THREADS_RULE
              ", got ", n);
    return static_cast<int>(n);
}

}  // namespace binding
}  // namespace mha
