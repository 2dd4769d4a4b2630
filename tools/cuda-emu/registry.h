// Kernels by name: each compiled module registers its extern "C" kernels (build.sh generates
// the registrations), and a launch unpacks the driver's parameter array into the kernel's
// parameter types.
#pragma once
#include <cstddef>
#include <cstring>
#include <utility>

namespace emu {
typedef void (*KernelEntry)(void** params);
struct Register {
    Register(const char* name, KernelEntry entry);
};
// A parameter copied out of the driver's array (whose entries need not be aligned for the
// parameter's type, as the GPU's parameter space is).
template <typename A> A param(const void* p) {
    A a;
    std::memcpy(static_cast<void*>(&a), p, sizeof a);
    return a;
}
template <typename... A, size_t... I> void call_with(void (*k)(A...), void** p, std::index_sequence<I...>) {
    k(param<A>(p[I])...);
}
template <typename... A> void call_all(void (*k)(A...), void** p) { call_with(k, p, std::index_sequence_for<A...>{}); }
template <auto K> void invoke(void** p) { call_all(K, p); }
}  // namespace emu
