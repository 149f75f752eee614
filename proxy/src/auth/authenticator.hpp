#pragma once
// Basic credentials against the user store, with a short cache of verified ones.
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "auth/lockout.hpp"
#include "dmz/proxy/users.hpp"

namespace dmz::proxy {

struct metrics;

/// Basic credentials against the user store, per worker: positive results are cached for a
/// few minutes (scrypt is deliberately slow), the file is re-read when it changes.
class authenticator {
public:
    authenticator(std::string path, std::shared_ptr<lockout_table> lockout) : path_(std::move(path)), lockout_(std::move(lockout)) {}
    struct result {
        bool ok = false;
        std::string user;
        std::vector<std::string> groups;
        std::string refusal;  ///< for the log: "bad password", "locked out", ...
    };
    result check(const std::string& user, const std::string& password, const std::string& listener = {},
                 const std::string& address = {}, const rules::lockout_policy& policy = {});
    bool configured() const { return !path_.empty(); }
    void count_into(metrics* m) { stats_ = m; }
    /// A reload named another user store: read it at the next check.
    void use(std::string path) {
        if (path == path_) return;
        path_ = std::move(path);
        store_.reset();
        mtime_ = -1;
        cache_.clear();
    }
    /// The stored user (for a forms session's groups and password generation), or null.
    const stored_user* lookup(const std::string& user) {
        refresh();
        return store_ ? store_->find(user) : nullptr;
    }

private:
    void refresh();
    std::string path_;
    std::unique_ptr<user_store> store_;
    std::int64_t mtime_ = -1;
    std::chrono::steady_clock::time_point checked_{};
    std::unordered_map<std::string, std::chrono::steady_clock::time_point> cache_;  ///< sha256(user:pw) -> expiry
    std::shared_ptr<lockout_table> lockout_;
    metrics* stats_ = nullptr;
};

}  // namespace dmz::proxy
