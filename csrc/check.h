// MHA_CHECK: argument validation that becomes a Python ValueError (std::invalid_argument) or
// TypeError (mha::type_error) through the binding's exception translators.
#pragma once

#include <new>
#include <sstream>
#include <stdexcept>
#include <string>

namespace mha {

// A wrong dtype: raised as TypeError in Python (SPEC section 4).
class type_error : public std::invalid_argument {
   public:
    using std::invalid_argument::invalid_argument;
};

// The interrupt hook of AttentionParams asked to stop (Ctrl-C): the outputs are incomplete.
class interrupted : public std::runtime_error {
   public:
    interrupted() : std::runtime_error("attention: interrupted") {}
};

// A native allocation failed (kernel scratch): a std::bad_alloc that says what and how much,
// raised as MemoryError with that message. The message lives in the object (no allocation).
class out_of_memory : public std::bad_alloc {
   public:
    explicit out_of_memory(long long bytes);
    const char* what() const noexcept override { return message_; }

   private:
    char message_[160];
};

// Throws interrupted / out_of_memory (`bytes` = the size that could not be allocated). Defined
// out of line (dispatch.cpp) so the kernels, compiled once per instruction set, never
// instantiate exception types themselves.
[[noreturn]] void throw_interrupted();
[[noreturn]] void throw_bad_alloc(long long bytes);

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
    std::ostringstream os;
    (os << ... << args);
    return os.str();
}
}  // namespace detail

}  // namespace mha

#define MHA_CHECK(cond, ...)                                                    \
    do {                                                                        \
        if (!(cond)) throw std::invalid_argument(::mha::detail::concat(__VA_ARGS__)); \
    } while (0)

#define MHA_CHECK_TYPE(cond, ...)                                         \
    do {                                                                  \
        if (!(cond)) throw ::mha::type_error(::mha::detail::concat(__VA_ARGS__)); \
    } while (0)
