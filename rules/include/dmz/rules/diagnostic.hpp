#pragma once
/// @file Findings and load errors: every one names file:line:column and a stable code.
#include <string>
#include <vector>

namespace dmz::rules {

struct source_location {
    std::string file;
    int line = 0;
    int column = 0;
    std::string to_string() const;  ///< "file:line:column", or "file" when no position
};

enum class severity { error, warning, info };
const char* to_string(severity s);

struct diagnostic {
    severity level = severity::error;
    std::string code;     ///< stable, e.g. "CFG002", "SMTP001"
    source_location where;
    std::string key;      ///< dotted key path, e.g. "rules[3].target.port"
    std::string message;
    std::string hint;     ///< how to fix it; may be empty
};

using diagnostics = std::vector<diagnostic>;

bool has_errors(const diagnostics& d);

/// The closest candidate by edit distance, or "" when none is close enough.
std::string did_you_mean(const std::string& word, const std::vector<std::string>& candidates);

}  // namespace dmz::rules
