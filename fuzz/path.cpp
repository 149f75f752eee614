// Fuzz target: request-target normalization (dmz::rules::normalize_target), which decides
// which publishing rule a path falls under, and path_has_prefix. Checks:
// - a safe path starts with '/', has no "." or ".." segment left, no '?', '#', '\' or
//   control byte, and every escape left in it is "%XX" in upper case for a byte that is
//   neither unreserved nor '/';
// - normalizing is idempotent: a safe path normalizes to itself, safe;
// - escaping an unreserved character of the path ("a" -> "%61") changes nothing: same
//   safety, query and reason when unsafe; same path and decoded form when safe. This also
//   holds the one-pass shortcut for plain targets to the full pass;
// - a safe path lies under "/" and under its own first segment, in any case.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "check.hpp"
#include "dmz/rules/path.hpp"

namespace {

using namespace dmz::rules;

bool unreserved(unsigned char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
           c == '_' || c == '~';
}

int upper_hex(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

void check_safe_path(std::string_view p) {
    DMZ_FUZZ_CHECK(!p.empty() && p.front() == '/');
    std::string_view rest = p.substr(1);
    // One segment per round.
    for (std::size_t rounds = 0; rounds <= p.size(); ++rounds) {
        auto slash = rest.find('/');
        auto seg = rest.substr(0, slash);
        DMZ_FUZZ_CHECK(seg != "." && seg != "..");
        if (slash == std::string_view::npos) break;
        rest.remove_prefix(slash + 1);
    }
    for (std::size_t i = 0; i < p.size(); ++i) {
        auto c = static_cast<unsigned char>(p[i]);
        DMZ_FUZZ_CHECK(c != '?' && c != '#' && c != '\\' && c >= 0x20 && c != 0x7f);
        if (c != '%') continue;
        DMZ_FUZZ_CHECK(i + 2 < p.size());
        int hi = upper_hex(p[i + 1]), lo = upper_hex(p[i + 2]);
        DMZ_FUZZ_CHECK(hi >= 0 && lo >= 0);
        auto v = static_cast<unsigned char>(hi * 16 + lo);
        DMZ_FUZZ_CHECK(!unreserved(v) && v != '/');
        i += 2;
    }
}

/// `target` with one unreserved character of its path (not part of an escape) written as
/// an escape, chosen by `pick`; "" when the path has none.
std::string escape_one(std::string_view target, std::size_t pick, bool lower_hex) {
    auto path_end = target.find('?');
    if (path_end == std::string_view::npos) path_end = target.size();
    std::size_t candidates = 0, chosen = std::string_view::npos;
    for (int pass = 0; pass < 2; ++pass) {
        std::size_t seen = 0;
        for (std::size_t i = 0; i < path_end; ++i) {
            if (target[i] == '%') {
                i += 2;
                continue;
            }
            if (!unreserved(static_cast<unsigned char>(target[i]))) continue;
            if (pass == 1 && seen == pick % candidates) {
                chosen = i;
                break;
            }
            ++seen;
        }
        candidates = seen;
        if (candidates == 0) return {};
    }
    static constexpr char upper[] = "0123456789ABCDEF", lower[] = "0123456789abcdef";
    const char* digits = lower_hex ? lower : upper;
    auto c = static_cast<unsigned char>(target[chosen]);
    std::string out(target.substr(0, chosen));
    out += '%';
    out += digits[c >> 4];
    out += digits[c & 15];
    out += target.substr(chosen + 1);
    return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::string_view in(reinterpret_cast<const char*>(data), size);
    dmz::fuzz::lcg rng(in);
    auto n = normalize_target(in);
    auto q = in.find('?');
    DMZ_FUZZ_CHECK(n.query == (q == std::string_view::npos ? std::string_view{} : in.substr(q + 1)));

    if (n.safe()) {
        check_safe_path(n.path);
        std::string again_target = n.path;
        if (q != std::string_view::npos) again_target += "?" + n.query;
        auto again = normalize_target(again_target);
        DMZ_FUZZ_CHECK(again.safe() && again.path == n.path && again.query == n.query);

        DMZ_FUZZ_CHECK(path_has_prefix(n.path, "/"));
        auto first = n.path.substr(0, n.path.find('/', 1));
        DMZ_FUZZ_CHECK(path_has_prefix(n.path, first) && path_has_prefix(to_lower(n.path), first));
        DMZ_FUZZ_CHECK(contains_nocase(n.path, to_lower(first)));
    } else {
        DMZ_FUZZ_CHECK(n.unsafe.size() > 3);
    }

    auto variant = escape_one(in, rng.below(size + 1), rng.below(2) == 1);
    if (!variant.empty()) {
        auto v = normalize_target(variant);
        DMZ_FUZZ_CHECK(v.safe() == n.safe() && v.unsafe == n.unsafe);
        DMZ_FUZZ_CHECK(v.query == n.query);
        // (An unsafe target's path and decoded form may be its raw text, which differs.)
        if (n.safe()) DMZ_FUZZ_CHECK(v.path == n.path && v.decoded == n.decoded);
    }
    return 0;
}
