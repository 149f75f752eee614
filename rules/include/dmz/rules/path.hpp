#pragma once
/// @file Request-target normalization, done once per request, as IIS will see it.
#include <string>
#include <string_view>

namespace dmz::rules {

struct normalized_target {
    /// Path with unreserved percent-escapes decoded, other escapes in upper case,
    /// and dot-segments removed (RFC 3986 6.2.2 and 5.2.4).
    std::string path;
    /// The query as received, without the '?'.
    std::string query;
    /// Path and query fully percent-decoded once, for attack-shape checks.
    std::string decoded;
    /// Empty when the path is safe; otherwise why it never matches a publishing rule.
    std::string unsafe;
    bool safe() const { return unsafe.empty(); }
};

/// Normalizes an origin-form request-target ("/owa/?ae=Folder").
normalized_target normalize_target(std::string_view target);

/// True when `path` lies under `prefix`, compared case-insensitively the way IIS matches
/// virtual directories, on a segment boundary: "/owa" matches "/owa" and "/OWA/x" but
/// not "/owanage".
bool path_has_prefix(std::string_view path, std::string_view prefix);

/// Case-insensitive search for `needle` (lower case) in `haystack`.
bool contains_nocase(std::string_view haystack, std::string_view needle);

std::string to_lower(std::string_view s);

}  // namespace dmz::rules
