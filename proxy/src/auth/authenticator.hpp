#pragma once
// Basic credentials against the user store. The slow parts (scrypt, reading the store)
// run on the check_pool, never on a worker's thread; a verified password is cached per
// worker for a few minutes, so a signed-in user costs no scrypt.
#include <chrono>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "auth/check_pool.hpp"
#include "auth/lockout.hpp"
#include "dmz/proxy/users.hpp"
#include "dmz/rules/fault.hpp"
#include "dmz/rules/ip.hpp"

namespace dmz::proxy {

struct metrics;

/// The user store of one instance, shared by its workers: an immutable snapshot, replaced
/// when the file changes. Only refresh() reads the file, and only pool threads call it.
class user_directory : public std::enable_shared_from_this<user_directory> {
public:
    /// Reads `path` now (at start-up); "" for none.
    explicit user_directory(std::string path);
    /// A reload named another file: the next refresh() reads it.
    void use(std::string path);
    /// Looks at the file (at most once a second) and re-reads it when it changed. A file
    /// that does not load keeps the previous store (said on standard error).
    void refresh();
    /// refresh() on the pool, unless one waits there already.
    void refresh_soon(check_pool& pool);
    std::pair<std::shared_ptr<const user_store>, std::uint64_t> snapshot() const;
    /// Changes whenever the snapshot does (lets a worker skip the lock otherwise).
    std::uint64_t generation() const { return generation_.load(std::memory_order_acquire); }
    bool configured() const;

private:
    mutable std::mutex m_;
    std::mutex reading_;  ///< one refresh at a time
    std::string path_;
    std::shared_ptr<const user_store> store_;
    std::int64_t mtime_ = -1;
    std::chrono::steady_clock::time_point checked_{};
    std::atomic<std::uint64_t> generation_{0};
    std::atomic<bool> queued_{false};
};

/// What a worker's authenticator shares with the instance.
struct auth_context {
    std::shared_ptr<user_directory> users;
    std::shared_ptr<lockout_table> lockout;
    std::shared_ptr<check_pool> pool;
};

/// Basic credentials, per worker (confined to its thread).
class authenticator {
public:
    explicit authenticator(auth_context ctx) : ctx_(std::move(ctx)) {}
    struct result {
        bool ok = false;
        std::string user;
        std::vector<std::string> groups;
        std::string refusal;      ///< for the log: "bad password", "locked out", ...
        bool overloaded = false;  ///< the password checks' queue was full: answer 503, not 401
    };
    /// A cached password answers at once; anything else is checked on the pool. Arguments
    /// are referenced while the coroutine runs: pass named values, not temporaries.
    net::task<result> check(const std::string& user, const std::string& password, const std::string& listener,
                            const rules::ip_address& client, const rules::lockout_policy& policy);
    bool configured() const { return ctx_.users && ctx_.users->configured(); }
    void count_into(metrics* m) { stats_ = m; }
    /// The stored user in this worker's snapshot (for a forms session's groups and password
    /// generation), or null. Never reads the file: it asks the pool to look (once a second).
    const stored_user* lookup(const std::string& user);

private:
    /// Takes the directory's newest snapshot (dropping the cache when it changed).
    void keep_current();
    result finish(result r);
    auth_context ctx_;
    std::shared_ptr<const user_store> store_;
    std::uint64_t generation_ = ~std::uint64_t{0};
    std::chrono::steady_clock::time_point asked_{};
    std::unordered_map<std::string, std::chrono::steady_clock::time_point> cache_;  ///< sha256(user NUL pw) -> expiry
    metrics* stats_ = nullptr;
};

/// The 503 a request hears when the password checks' queue is full.
rules::fault auth_overloaded_fault(const std::string& user);

}  // namespace dmz::proxy
