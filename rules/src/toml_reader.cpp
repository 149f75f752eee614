#include "dmz/rules/toml_reader.hpp"

#include <cerrno>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace dmz::rules {

source_location toml_reader::at(const toml::node& n) const {
    auto& s = n.source();
    return {file_, static_cast<int>(s.begin.line), static_cast<int>(s.begin.column)};
}

source_location toml_reader::at(const toml::key& k) const {
    auto& s = k.source();
    return {file_, static_cast<int>(s.begin.line), static_cast<int>(s.begin.column)};
}

source_location toml_reader::at_key(const toml::table& t, std::string_view key) const {
    for (auto&& [k, v] : t)
        if (k.str() == key) return at(k);
    return at(t);
}

void toml_reader::report(severity level, std::string code, source_location where,
                         std::string key, std::string message, std::string hint) {
    out_.push_back({level, std::move(code), std::move(where), std::move(key), std::move(message),
                    std::move(hint)});
}

std::string toml_reader::join(std::string_view path, std::string_view key) {
    if (path.empty()) return std::string(key);
    std::string out(path);
    out += '.';
    out += key;
    return out;
}

const char* toml_reader::type_name(const toml::node& n) {
    switch (n.type()) {
    case toml::node_type::string: return "a string";
    case toml::node_type::integer: return "an integer";
    case toml::node_type::floating_point: return "a number";
    case toml::node_type::boolean: return "a boolean";
    case toml::node_type::table: return "a table";
    case toml::node_type::array: return "an array";
    case toml::node_type::date:
    case toml::node_type::time:
    case toml::node_type::date_time: return "a date/time";
    default: return "nothing";
    }
}

void toml_reader::only_keys(const toml::table& t, std::string_view path,
                            std::initializer_list<std::string_view> allowed) {
    std::vector<std::string> names(allowed.begin(), allowed.end());
    for (auto&& [k, v] : t) {
        bool ok = false;
        for (auto a : allowed) ok = ok || a == k.str();
        if (ok) continue;
        auto guess = did_you_mean(std::string(k.str()), names);
        std::string msg = "unknown key '" + std::string(k.str()) + "'";
        if (!path.empty()) msg += " in '" + std::string(path) + "'";
        std::string hint = guess.empty() ? "allowed here: " : "did you mean '" + guess + "'?";
        if (guess.empty()) {
            for (std::size_t i = 0; i < names.size(); ++i) hint += (i ? ", " : "") + names[i];
        }
        error("CFG002", at(k), join(path, k.str()), msg, hint);
    }
}

void toml_reader::wrong_type(const toml::table& t, std::string_view key, std::string_view path,
                             const toml::node& n, std::string_view expected) {
    (void)t;
    error("CFG003", at(n), join(path, key),
          "'" + join(path, key) + "' must be " + std::string(expected) + ", not " + type_name(n));
}

std::optional<std::string> toml_reader::str(const toml::table& t, std::string_view key,
                                            std::string_view path, bool required) {
    auto* n = t.get(key);
    if (!n) {
        if (required)
            error("CFG008", at(t), join(path, key),
                  "missing required key '" + join(path, key) + "'");
        return std::nullopt;
    }
    if (auto* s = n->as_string()) return s->get();
    wrong_type(t, key, path, *n, "a string");
    return std::nullopt;
}

std::optional<bool> toml_reader::boolean(const toml::table& t, std::string_view key,
                                         std::string_view path) {
    auto* n = t.get(key);
    if (!n) return std::nullopt;
    if (auto* b = n->as_boolean()) return b->get();
    wrong_type(t, key, path, *n, "true or false");
    return std::nullopt;
}

std::optional<std::int64_t> toml_reader::integer(const toml::table& t, std::string_view key,
                                                 std::string_view path, std::int64_t min,
                                                 std::int64_t max, bool required) {
    auto* n = t.get(key);
    if (!n) {
        if (required)
            error("CFG008", at(t), join(path, key),
                  "missing required key '" + join(path, key) + "'");
        return std::nullopt;
    }
    auto* i = n->as_integer();
    if (!i) {
        wrong_type(t, key, path, *n, "an integer");
        return std::nullopt;
    }
    if (i->get() < min || i->get() > max) {
        error("CFG004", at(*n), join(path, key),
              "'" + join(path, key) + "' is " + std::to_string(i->get()) + ", must be " +
                  std::to_string(min) + ".." + std::to_string(max));
        return std::nullopt;
    }
    return i->get();
}

std::vector<std::string> toml_reader::strings(const toml::table& t, std::string_view key,
                                              std::string_view path, bool required) {
    std::vector<std::string> out;
    auto* n = t.get(key);
    if (!n) {
        if (required)
            error("CFG008", at(t), join(path, key),
                  "missing required key '" + join(path, key) + "'");
        return out;
    }
    if (auto* s = n->as_string()) {
        out.push_back(s->get());
        return out;
    }
    auto* a = n->as_array();
    if (!a) {
        wrong_type(t, key, path, *n, "a string or an array of strings");
        return out;
    }
    std::size_t idx = 0;
    for (auto& el : *a) {
        if (auto* s = el.as_string()) {
            out.push_back(s->get());
        } else {
            auto k = join(path, key) + "[" + std::to_string(idx) + "]";
            error("CFG003", at(el), k, "'" + k + "' must be a string, not " + type_name(el));
        }
        ++idx;
    }
    return out;
}

std::vector<std::pair<std::string, source_location>> toml_reader::located_strings(
    const toml::table& t, std::string_view key, std::string_view path, bool required) {
    std::vector<std::pair<std::string, source_location>> out;
    auto values = strings(t, key, path, required);
    auto* n = t.get(key);
    for (std::size_t i = 0; i < values.size(); ++i) {
        const toml::node* el = n && n->as_array() ? n->as_array()->get(i) : n;
        out.emplace_back(values[i], el ? at(*el) : at(t));
    }
    return out;
}

namespace {
bool split_number_unit(std::string_view s, std::uint64_t& number, std::string_view& unit) {
    while (!s.empty() && s.front() == ' ') s.remove_prefix(1);
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), number);
    if (ec != std::errc{} || p == s.data()) return false;
    unit = std::string_view(p, static_cast<std::size_t>(s.data() + s.size() - p));
    while (!unit.empty() && unit.front() == ' ') unit.remove_prefix(1);
    return true;
}
}  // namespace

std::optional<millis> toml_reader::duration(const toml::table& t, std::string_view key,
                                            std::string_view path) {
    auto* n = t.get(key);
    if (!n) return std::nullopt;
    if (auto* i = n->as_integer()) {
        if (i->get() < 0 || i->get() > 10LL * 24 * 3600) {
            error("CFG004", at(*n), join(path, key),
                  "'" + join(path, key) + "' must be 0..864000 seconds");
            return std::nullopt;
        }
        return std::chrono::seconds(i->get());
    }
    auto* s = n->as_string();
    if (!s) {
        wrong_type(t, key, path, *n, "a duration (seconds, or a string like \"30s\", \"15m\")");
        return std::nullopt;
    }
    std::uint64_t v = 0;
    std::string_view unit;
    if (split_number_unit(s->get(), v, unit) && v <= 10ULL * 24 * 3600 * 1000) {
        if (unit == "ms") return millis(v);
        if (unit == "s" || unit.empty()) return std::chrono::seconds(v);
        if (unit == "m" || unit == "min") return std::chrono::minutes(v);
        if (unit == "h") return std::chrono::hours(v);
    }
    error("CFG004", at(*n), join(path, key),
          "'" + s->get() + "' is not a duration", "write seconds, or e.g. \"500ms\", \"30s\", \"15m\", \"1h\"");
    return std::nullopt;
}

std::optional<std::uint64_t> toml_reader::size(const toml::table& t, std::string_view key,
                                               std::string_view path) {
    auto* n = t.get(key);
    if (!n) return std::nullopt;
    if (auto* i = n->as_integer()) {
        if (i->get() < 0) {
            error("CFG004", at(*n), join(path, key), "'" + join(path, key) + "' must not be negative");
            return std::nullopt;
        }
        return static_cast<std::uint64_t>(i->get());
    }
    auto* s = n->as_string();
    if (!s) {
        wrong_type(t, key, path, *n, "a size (bytes, or a string like \"64MiB\")");
        return std::nullopt;
    }
    std::uint64_t v = 0;
    std::string_view unit;
    if (split_number_unit(s->get(), v, unit)) {
        struct u { std::string_view name; std::uint64_t mult; };
        static constexpr u units[] = {{"", 1}, {"B", 1}, {"KB", 1000}, {"MB", 1000000},
                                      {"GB", 1000000000}, {"KiB", 1024}, {"MiB", 1024 * 1024},
                                      {"GiB", 1024ULL * 1024 * 1024}};
        for (auto& x : units)
            if (x.name == unit && v <= UINT64_MAX / x.mult) return v * x.mult;
    }
    error("CFG004", at(*n), join(path, key), "'" + s->get() + "' is not a size",
          "write bytes, or e.g. \"64KiB\", \"10MiB\", \"1GiB\", \"35MB\"");
    return std::nullopt;
}

const toml::table* toml_reader::table(const toml::table& t, std::string_view key,
                                      std::string_view path, bool required) {
    auto* n = t.get(key);
    if (!n) {
        if (required)
            error("CFG008", at(t), join(path, key),
                  "missing required table '" + join(path, key) + "'");
        return nullptr;
    }
    if (auto* tt = n->as_table()) return tt;
    wrong_type(t, key, path, *n, "a table");
    return nullptr;
}

const toml::array* toml_reader::array(const toml::table& t, std::string_view key,
                                      std::string_view path) {
    auto* n = t.get(key);
    if (!n) return nullptr;
    if (auto* a = n->as_array()) return a;
    wrong_type(t, key, path, *n, "an array");
    return nullptr;
}

bool toml_reader::one_of(const std::string& value, const toml::table& t, std::string_view key,
                         std::string_view path, std::initializer_list<std::string_view> choices) {
    std::vector<std::string> names(choices.begin(), choices.end());
    for (auto& c : names)
        if (c == value) return true;
    std::string list;
    for (std::size_t i = 0; i < names.size(); ++i) list += (i ? ", " : "") + names[i];
    auto guess = did_you_mean(value, names);
    auto* n = t.get(key);
    error("CFG004", n ? at(*n) : at(t), join(path, key),
          "'" + value + "' is not a valid " + join(path, key) + " (one of: " + list + ")",
          guess.empty() ? "" : "did you mean '" + guess + "'?");
    return false;
}

namespace {
/// toml++ 3.3 (Debian 12) reaches __builtin_unreachable() when it asks whether some non-ASCII
/// characters are whitespace (its unicode_autogenerated.h; upstream issues 190 and 295):
/// undefined behaviour, from a typo such as `max_body = 35Mé`. It asks about characters it
/// reads outside strings and comments, and in a multi-line basic string about the one after
/// a backslash and the first one after a line-ending backslash. All of those are syntax
/// errors but the last. This finds the first such character (a BOM that starts the text
/// aside) before toml++ sees it: a small lexer that takes a quote for the start of a string
/// only where a key or a value starts (after '=', '[', '{', ',', a key's '.', or a line
/// break). toml++ reads a bare value up to whitespace, ']', '}', ',' or '#', quotes and
/// brackets included. After a value that starts with a digit, one space and a digit (a date,
/// then perhaps a time) it looks ahead: it takes the byte after that digit whatever it is (a
/// line break too), then reads on to the next of those terminators. Returns the character's
/// byte offset, or npos.
std::size_t toml_unsafe_character(std::string_view t, bool& in_string) {
    enum class state { top, comment, basic, literal, ml_basic, ml_literal } st = state::top;
    bool key = true;          // a key comes next (else a value)
    bool start = true;        // a key or a value may start here
    bool in_value = false;    // inside a bare value
    bool digit_value = false; // that value starts with a digit
    std::string open;         // '[' table header, 'a' array, '{' inline table
    std::size_t i = t.starts_with("\xef\xbb\xbf") ? 3 : 0;
    auto run_of = [&](char q) {
        std::size_t n = 0;
        while (i + n < t.size() && t[i + n] == q) ++n;
        return n;
    };
    auto terminator = [](char c) {
        return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f' || c == ']' || c == '}' ||
               c == ',' || c == '#';
    };
    auto line_break = [&] {
        in_value = false;
        if (open.empty()) key = true;
        start = true;  // in brackets too: what follows a value without ',' is an error toml++ stops at
    };
    // Each round moves i forward by at least one byte.
    while (i < t.size()) {
        char c = t[i];
        auto u = static_cast<unsigned char>(c);
        switch (st) {
        case state::top: {
            if (u >= 0x80) return in_string = false, i;
            if (c == '\n') {
                line_break();
                break;
            }
            if (in_value && !terminator(c)) break;
            if (in_value && digit_value && c == ' ' && i + 1 < t.size() && t[i + 1] >= '0' && t[i + 1] <= '9') {
                // toml++'s look-ahead for a date-time's time. A valid time holds only ASCII and
                // ends at a terminator, so what it reads past is read again as usual.
                std::size_t j = i + 2;
                if (j < t.size() && static_cast<unsigned char>(t[j]) >= 0x80) return in_string = false, j;
                if (j < t.size()) ++j;
                for (; j < t.size() && !terminator(t[j]); ++j)
                    if (static_cast<unsigned char>(t[j]) >= 0x80) return in_string = false, j;
                in_value = false;
                start = false;
                i = j;
                continue;
            }
            in_value = false;
            switch (c) {
            case ' ': case '\t': case '\r': case '\v': case '\f': break;
            case '#': st = state::comment; break;
            case '=':
                key = false;
                start = true;
                break;
            case '[':
                open += key && (open.empty() || open.back() == '[') ? '[' : 'a';
                start = true;
                break;
            case '{':
                open += '{';
                key = true;
                start = true;
                break;
            case ']': case '}':
                if (!open.empty()) open.pop_back();
                start = false;
                break;
            case ',':
                if (!open.empty()) key = open.back() == '{';
                start = true;
                break;
            case '.':
                start = key;  // a key's separator; in a value, part of it
                in_value = !key;
                digit_value = false;
                break;
            case '"': case '\'':
                if (!start) break;  // not where a string can start: toml++ stops here or reads it as bare
                {
                    bool triple = run_of(c) >= 3;
                    st = c == '"' ? (triple ? state::ml_basic : state::basic) : (triple ? state::ml_literal : state::literal);
                    i += triple ? 3 : 1;
                    start = false;
                }
                continue;
            default:
                start = false;
                in_value = !key;
                digit_value = c >= '0' && c <= '9';
            }
            break;
        }
        case state::comment:
            if (c == '\n') {
                st = state::top;
                line_break();
            }
            break;
        case state::basic:
            if (c == '\\') ++i;  // the escaped byte is never a delimiter
            else if (c == '"' || c == '\n') st = state::top;
            break;
        case state::literal:
            if (c == '\'' || c == '\n') st = state::top;
            break;
        case state::ml_basic:
        case state::ml_literal: {
            char q = st == state::ml_basic ? '"' : '\'';
            if (c == q) {
                auto n = run_of(q);
                if (n >= 3) st = state::top;  // up to two quotes before the closing three
                i += n;
                continue;
            }
            if (st == state::ml_basic && c == '\\' && i + 1 < t.size()) {
                ++i;
                auto e = static_cast<unsigned char>(t[i]);
                if (e == ' ' || e == '\t' || e == '\r' || e == '\n') {
                    // A line-ending backslash: toml++ looks at the first byte after the blanks.
                    while (i < t.size() && (t[i] == ' ' || t[i] == '\t' || t[i] == '\r' || t[i] == '\n')) ++i;
                    if (i < t.size() && static_cast<unsigned char>(t[i]) >= 0x80) return in_string = true, i;
                    continue;
                }
                if (e >= 0x80) return in_string = true, i;
            }
            break;
        }
        }
        ++i;
    }
    return std::string_view::npos;
}

/// Line and column of byte `at`, as toml++ counts them (code points, a leading BOM not
/// counted).
std::pair<int, int> text_position(std::string_view t, std::size_t at) {
    int line = 1, column = 1;
    for (std::size_t i = t.starts_with("\xef\xbb\xbf") ? 3 : 0; i < at && i < t.size(); ++i) {
        if (t[i] == '\n') {
            ++line;
            column = 1;
        } else if ((static_cast<unsigned char>(t[i]) & 0xc0) != 0x80) {
            ++column;
        }
    }
    return {line, column};
}
}  // namespace

std::optional<toml::table> parse_toml(std::string_view text, const std::string& file,
                                      diagnostics& out) {
    bool in_string = false;
    if (auto at = toml_unsafe_character(text, in_string); at != std::string_view::npos) {
        auto [line, column] = text_position(text, at);
        out.push_back({severity::error, "CFG001", {file, line, column}, "",
                       in_string ? "TOML syntax: a non-ASCII character right after a backslash in a multi-line string"
                                 : "TOML syntax: a non-ASCII character outside a string or comment",
                       in_string ? "move it to the line before, or write it as \\uXXXX" : ""});
        return std::nullopt;
    }
    try {
        return toml::parse(text, std::string_view(file));
    } catch (const toml::parse_error& e) {
        auto& s = e.source();
        out.push_back({severity::error, "CFG001",
                       {file, static_cast<int>(s.begin.line), static_cast<int>(s.begin.column)},
                       "", "TOML syntax: " + std::string(e.description()), ""});
        return std::nullopt;
    }
}

std::optional<toml::table> parse_toml_file(const std::string& path, diagnostics& out,
                                           const source_location& referenced_from) {
    std::error_code dir_ec;
    if (std::filesystem::is_directory(path, dir_ec)) {
        auto where = referenced_from.file.empty() ? source_location{path, 0, 0} : referenced_from;
        out.push_back({severity::error, "CFG007", where, "", "'" + path + "' is a directory, not a TOML file",
                       "name the file itself (for example " + (std::filesystem::path(path) / "front-end.toml").string() + ")"});
        return std::nullopt;
    }
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        int err = errno;
        auto where = referenced_from.file.empty() ? source_location{path, 0, 0} : referenced_from;
        out.push_back({severity::error, "CFG007", where, "",
                       "cannot read '" + path + "': " + std::strerror(err), ""});
        return std::nullopt;
    }
    std::ostringstream ss;
    ss << in.rdbuf();
    return parse_toml(ss.str(), path, out);
}

}  // namespace dmz::rules
