#pragma once
// Helpers shared by the unit tests: where a snippet sits in a config text, and a readable
// dump of diagnostics for failure messages.
#include <gtest/gtest.h>

#include <string>
#include <string_view>
#include <vector>

#include "dmz/rules/diagnostic.hpp"

namespace dmz::test {

struct text_pos {
    int line = 0;
    int column = 0;
};

/// 1-based line and column of the nth occurrence of `needle` in `text`, as toml++ counts.
inline text_pos pos_of(std::string_view text, std::string_view needle, int nth = 1) {
    std::size_t at = std::string_view::npos, from = 0;
    for (int i = 0; i < nth; ++i) {
        at = text.find(needle, from);
        if (at == std::string_view::npos) {
            ADD_FAILURE() << "'" << needle << "' not in the config text";
            return {};
        }
        from = at + 1;
    }
    text_pos p{1, 1};
    for (std::size_t i = 0; i < at; ++i) {
        if (text[i] == '\n') {
            ++p.line;
            p.column = 1;
        } else {
            ++p.column;
        }
    }
    return p;
}

inline std::string dump(const rules::diagnostics& d) {
    std::string out;
    for (auto& x : d)
        out += "  " + x.where.to_string() + " " + rules::to_string(x.level) + " " + x.code + " [" + x.key + "] " +
               x.message + (x.hint.empty() ? "" : " | " + x.hint) + "\n";
    return out;
}

inline std::vector<const rules::diagnostic*> with_code(const rules::diagnostics& d, std::string_view code) {
    std::vector<const rules::diagnostic*> out;
    for (auto& x : d)
        if (x.code == code) out.push_back(&x);
    return out;
}

}  // namespace dmz::test
