#pragma once
/// @file Typed, located reading of TOML tables for the config and topology loaders.
/// Every problem becomes one diagnostic with file:line:column and the dotted key; unknown
/// keys are errors with a did-you-mean. Include only from loaders: it pulls in toml++.
#include <toml++/toml.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "dmz/rules/diagnostic.hpp"
#include "dmz/rules/model.hpp"

namespace dmz::rules {

class toml_reader {
public:
    toml_reader(std::string file, diagnostics& out) : file_(std::move(file)), out_(out) {}

    const std::string& file() const { return file_; }
    source_location at(const toml::node& n) const;
    source_location at(const toml::key& k) const;
    /// Where `key` is written inside `t`, or where `t` starts when the key is absent.
    source_location at_key(const toml::table& t, std::string_view key) const;

    void report(severity level, std::string code, source_location where, std::string key,
                std::string message, std::string hint = {});
    void error(std::string code, source_location where, std::string key, std::string message,
               std::string hint = {}) {
        report(severity::error, std::move(code), std::move(where), std::move(key),
               std::move(message), std::move(hint));
    }

    /// Reports every key of `t` not in `allowed` (CFG002) with a did-you-mean.
    void only_keys(const toml::table& t, std::string_view path,
                   std::initializer_list<std::string_view> allowed);

    std::optional<std::string> str(const toml::table& t, std::string_view key,
                                   std::string_view path, bool required = false);
    std::optional<bool> boolean(const toml::table& t, std::string_view key, std::string_view path);
    std::optional<std::int64_t> integer(const toml::table& t, std::string_view key,
                                        std::string_view path, std::int64_t min, std::int64_t max,
                                        bool required = false);
    /// A string or an array of strings.
    std::vector<std::string> strings(const toml::table& t, std::string_view key,
                                     std::string_view path, bool required = false);
    /// Like strings(), with where each element is written.
    std::vector<std::pair<std::string, source_location>> located_strings(
        const toml::table& t, std::string_view key, std::string_view path, bool required = false);
    /// Seconds as an integer, or a string with a unit: "500ms", "30s", "15m", "1h".
    std::optional<millis> duration(const toml::table& t, std::string_view key,
                                   std::string_view path);
    /// Bytes as an integer, or a string with a unit: "64KiB", "10MiB", "1GiB", "35MB".
    std::optional<std::uint64_t> size(const toml::table& t, std::string_view key,
                                      std::string_view path);
    const toml::table* table(const toml::table& t, std::string_view key, std::string_view path,
                             bool required = false);
    const toml::array* array(const toml::table& t, std::string_view key, std::string_view path);
    /// Checks that `value` is one of `choices`; reports CFG004 with a did-you-mean otherwise.
    bool one_of(const std::string& value, const toml::table& t, std::string_view key,
                std::string_view path, std::initializer_list<std::string_view> choices);

    static std::string join(std::string_view path, std::string_view key);
    static const char* type_name(const toml::node& n);

private:
    void wrong_type(const toml::table& t, std::string_view key, std::string_view path,
                    const toml::node& n, std::string_view expected);
    std::string file_;
    diagnostics& out_;
};

/// Parses TOML text; on a syntax error appends CFG001 and returns nullopt.
std::optional<toml::table> parse_toml(std::string_view text, const std::string& file,
                                      diagnostics& out);
/// Reads a file and parses it; a missing or unreadable file is CFG007.
std::optional<toml::table> parse_toml_file(const std::string& path, diagnostics& out,
                                           const source_location& referenced_from = {});

}  // namespace dmz::rules
