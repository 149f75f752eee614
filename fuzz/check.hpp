#pragma once
// What every fuzz target shares: an invariant check that stops the process the way both
// libFuzzer (a crash, with the input saved) and ctest (a failed replay) see, and small
// helpers the checks use.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string_view>

#define DMZ_FUZZ_CHECK(cond)                                                                   \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            std::fprintf(stderr, "%s:%d: invariant broken: %s\n", __FILE__, __LINE__, #cond); \
            std::abort();                                                                      \
        }                                                                                      \
    } while (0)

namespace dmz::fuzz {

/// Whether `part` points into `whole` (an empty view anywhere counts).
inline bool within(std::string_view part, std::string_view whole) {
    if (part.empty()) return true;
    std::less_equal<const char*> le;
    return le(whole.data(), part.data()) && le(part.data() + part.size(), whole.data() + whole.size());
}

/// A small deterministic generator seeded from the input, for split points and piece
/// sizes: the same input always takes the same path, so a crash replays.
class lcg {
public:
    explicit lcg(std::string_view seed) {
        for (unsigned char c : seed) state_ = (state_ ^ c) * 0x100000001b3ull;  // FNV-1a
    }
    std::uint64_t next() {
        state_ = state_ * 6364136223846793005ull + 1442695040888963407ull;
        return state_ >> 33;
    }
    /// Uniform enough in [0, n); 0 when n is 0.
    std::size_t below(std::size_t n) { return n ? static_cast<std::size_t>(next() % n) : 0; }

private:
    std::uint64_t state_ = 0xcbf29ce484222325ull;
};

}  // namespace dmz::fuzz
