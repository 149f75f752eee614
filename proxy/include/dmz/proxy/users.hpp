#pragma once
/// @file The listener user store: names, groups and salted scrypt password hashes in a
/// TOML file that `dmzproxy users` manages.
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "dmz/rules/diagnostic.hpp"

namespace dmz::proxy {

struct stored_user {
    std::string name;
    std::string hash;  ///< "$scrypt$ln=15,r=8,p=1$<salt>$<key>", base64
    std::vector<std::string> groups;
};

class user_store {
public:
    /// Loads `path` through the config loaders' TOML reader; a missing file is an empty
    /// store. A malformed one appends diagnostics (file:line:column, code, key; unknown keys
    /// are errors) to `out` and gives nullopt.
    static std::optional<user_store> load(const std::string& path, rules::diagnostics& out);
    /// The same, throwing std::runtime_error with one "file:line:column: CODE: message"
    /// line per problem.
    static user_store load(const std::string& path);
    /// Writes atomically (temporary file renamed into place), mode 0600.
    void save(const std::string& path) const;

    const stored_user* find(const std::string& name) const;
    /// Adds or replaces a user's password (and groups, when given).
    void set(const std::string& name, const std::string& password, const std::optional<std::vector<std::string>>& groups);
    bool remove(const std::string& name);
    const std::map<std::string, stored_user>& users() const { return users_; }

    /// Checks a password; constant time in the comparison. An unknown user costs the same
    /// as a known one, so timing does not tell names apart.
    bool verify(const std::string& name, const std::string& password) const;

private:
    std::map<std::string, stored_user> users_;
};

/// Hashes with scrypt (N = 2^15, r = 8, p = 1) and a random 16-byte salt. Throws
/// std::runtime_error when OpenSSL has no random bytes to give.
std::string hash_password(const std::string& password);
bool check_password(const std::string& password, const std::string& hash);

std::string base64_encode(const std::string& in);
std::optional<std::string> base64_decode(const std::string& in);

}  // namespace dmz::proxy
