#include "dmz/rules/diagnostic.hpp"

#include <algorithm>

namespace dmz::rules {

std::string source_location::to_string() const {
    if (line <= 0) return file;
    return file + ":" + std::to_string(line) + ":" + std::to_string(column);
}

const char* to_string(severity s) {
    switch (s) {
    case severity::error: return "error";
    case severity::warning: return "warning";
    case severity::info: return "info";
    }
    return "error";
}

bool has_errors(const diagnostics& d) {
    return std::any_of(d.begin(), d.end(), [](auto& x) { return x.level == severity::error; });
}

namespace {
std::size_t edit_distance(const std::string& a, const std::string& b) {
    std::vector<std::size_t> prev(b.size() + 1), cur(b.size() + 1);
    for (std::size_t j = 0; j <= b.size(); ++j) prev[j] = j;
    for (std::size_t i = 1; i <= a.size(); ++i) {
        cur[0] = i;
        for (std::size_t j = 1; j <= b.size(); ++j) {
            auto ca = static_cast<char>(std::tolower(static_cast<unsigned char>(a[i - 1])));
            auto cb = static_cast<char>(std::tolower(static_cast<unsigned char>(b[j - 1])));
            cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca == cb ? 0 : 1)});
        }
        std::swap(prev, cur);
    }
    return prev[b.size()];
}
}  // namespace

std::string did_you_mean(const std::string& word, const std::vector<std::string>& candidates) {
    std::string best;
    std::size_t best_d = std::max<std::size_t>(2, word.size() / 3) + 1;
    for (auto& c : candidates) {
        // The distance is at least the difference in length: skip what cannot be closer.
        auto gap = word.size() > c.size() ? word.size() - c.size() : c.size() - word.size();
        if (gap >= best_d) continue;
        auto d = edit_distance(word, c);
        if (d < best_d) {
            best_d = d;
            best = c;
        }
    }
    return best;
}

}  // namespace dmz::rules
