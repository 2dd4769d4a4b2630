// Kernels by name: each compiled module registers its extern "C" kernels (build.sh generates
// the registrations), and a launch unpacks the driver's parameter array into the kernel's
// parameter types.
#pragma once
#include <cstddef>
#include <utility>

namespace emu {
typedef void (*KernelEntry)(void** params);
struct Register {
    Register(const char* name, KernelEntry entry);
};
template <typename... A, size_t... I> void call_with(void (*k)(A...), void** p, std::index_sequence<I...>) {
    k(*static_cast<A*>(p[I])...);
}
template <typename... A> void call_all(void (*k)(A...), void** p) { call_with(k, p, std::index_sequence_for<A...>{}); }
template <auto K> void invoke(void** p) { call_all(K, p); }
}  // namespace emu
