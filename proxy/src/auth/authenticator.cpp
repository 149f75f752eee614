#include "auth/authenticator.hpp"

#include <openssl/sha.h>
#include <sys/stat.h>

#include <iostream>

#include "metrics.hpp"

namespace dmz::proxy {

namespace {
std::int64_t modified(const std::string& path) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) return 0;
    return static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
}

/// What a check on the pool found.
struct verdict {
    bool ok = false;
    std::string refusal;
    std::vector<std::string> groups;
    std::uint64_t generation = 0;
};

verdict verify_on_pool(user_directory& users, lockout_table* lockout, const std::string& user, const std::string& password,
                       const std::string& listener, const std::string& address, const rules::lockout_policy& policy) {
    users.refresh();
    auto [store, generation] = users.snapshot();
    verdict v;
    v.generation = generation;
    if (!store) {
        v.refusal = "no user store";
        return v;
    }
    // A locked-out user gets the same answer, after the same work, as a wrong password.
    v.refusal = lockout ? lockout->refused(listener, user, address, policy) : "";
    bool good = store->verify(user, password);
    v.ok = good && v.refusal.empty();
    if (v.ok) {
        if (auto* u = store->find(user)) v.groups = u->groups;
        if (lockout) lockout->succeeded(listener, user);
    } else if (v.refusal.empty()) {
        // Only a real bad password counts: attempts refused by the lockout itself do not
        // extend it (the user retrying must not lock themselves out for longer).
        v.refusal = store->find(user) ? "bad password" : "unknown user";
        if (lockout) lockout->failed(listener, user, address, policy);
    }
    return v;
}
}  // namespace

user_directory::user_directory(std::string path) : path_(std::move(path)) {
    if (path_.empty()) return;
    mtime_ = modified(path_);
    checked_ = std::chrono::steady_clock::now();
    try {
        store_ = std::make_shared<const user_store>(user_store::load(path_));
    } catch (const std::exception& e) {
        std::cerr << "dmzproxy: user store " << path_ << ": " << e.what() << "\n";
    }
    generation_.store(1, std::memory_order_release);
}

void user_directory::use(std::string path) {
    std::lock_guard lock(m_);
    if (path == path_) return;
    path_ = std::move(path);
    mtime_ = -1;
    checked_ = {};
}

void user_directory::refresh_soon(check_pool& pool) {
    if (queued_.exchange(true)) return;  // one waiting refresh is enough
    auto self = shared_from_this();
    if (!pool.try_submit([self] {
            self->queued_ = false;
            self->refresh();
        }))
        queued_ = false;  // a full queue: the next lookup asks again
}

bool user_directory::configured() const {
    std::lock_guard lock(m_);
    return !path_.empty();
}

std::pair<std::shared_ptr<const user_store>, std::uint64_t> user_directory::snapshot() const {
    std::lock_guard lock(m_);
    return {store_, generation_.load(std::memory_order_relaxed)};
}

void user_directory::refresh() {
    std::lock_guard one(reading_);
    std::string path;
    std::int64_t known = 0;
    {
        std::lock_guard lock(m_);
        auto now = std::chrono::steady_clock::now();
        if (path_.empty() || (store_ && mtime_ != -1 && now - checked_ < std::chrono::seconds(1))) return;
        checked_ = now;
        path = path_;
        known = mtime_;
    }
    auto m = modified(path);
    if (m == known) return;
    std::shared_ptr<const user_store> next;
    try {
        next = std::make_shared<const user_store>(user_store::load(path));
    } catch (const std::exception& e) {
        std::cerr << "dmzproxy: user store " << path << ": " << e.what() << " (keeping the previous one)\n";
        return;
    }
    std::lock_guard lock(m_);
    if (path != path_) return;  // another reload named yet another file meanwhile
    store_ = std::move(next);
    mtime_ = m;
    generation_.fetch_add(1, std::memory_order_release);  // a removed user or a new password takes effect at once
}

void authenticator::keep_current() {
    if (!ctx_.users) return;
    if (ctx_.users->generation() != generation_) {
        std::tie(store_, generation_) = ctx_.users->snapshot();
        cache_.clear();
    }
    // Even a cached password or a forms session must notice a changed file: ask the pool to
    // look at it (this request goes on with the snapshot it has). At most once a second per
    // worker, and never more than one such job waiting.
    auto now = std::chrono::steady_clock::now();
    if (ctx_.pool && now - asked_ >= std::chrono::seconds(1)) {
        asked_ = now;
        ctx_.users->refresh_soon(*ctx_.pool);
    }
}

const stored_user* authenticator::lookup(const std::string& user) {
    keep_current();
    return store_ ? store_->find(user) : nullptr;
}

authenticator::result authenticator::finish(result r) {
    if (!r.ok && stats_) stats_->auth_failed(r.refusal.empty() ? std::string("refused") : r.refusal);
    return r;
}

net::task<authenticator::result> authenticator::check(const std::string& user, const std::string& password, const std::string& listener,
                                                 const rules::ip_address& client, const rules::lockout_policy& policy) {
    keep_current();
    auto address = client.to_string();
    result r;
    if (!store_ || !ctx_.pool) {
        r.refusal = "no user store";
        co_return finish(std::move(r));
    }
    std::string key = user + '\0' + password;  // NUL: "a:b" + "c" and "a" + "b:c" differ
    unsigned char digest[SHA256_DIGEST_LENGTH];
    SHA256(reinterpret_cast<const unsigned char*>(key.data()), key.size(), digest);
    std::string k(reinterpret_cast<char*>(digest), sizeof digest);
    auto it = cache_.find(k);
    if (it != cache_.end() && it->second > std::chrono::steady_clock::now()) {
        // A locked-out user is refused even with a password that worked a minute ago:
        // otherwise guessing could go on past the lockout once the right one was cached.
        if (ctx_.lockout && ctx_.lockout->any()) r.refusal = ctx_.lockout->refused(listener, user, address, policy);
        auto* u = store_->find(user);
        if (r.refusal.empty() && u) r.ok = true, r.user = user, r.groups = u->groups;
        co_return finish(std::move(r));
    }
    // An address past its failure threshold costs no check at all: answered here, at once,
    // as a wrong password is. (A user's lockout still costs the check's work, so its timing
    // says nothing about whether the user exists.)
    if (ctx_.lockout && ctx_.lockout->any()) {
        r.refusal = ctx_.lockout->address_refused(listener, address, policy);
        if (!r.refusal.empty()) co_return finish(std::move(r));
    }
    auto job = [users = ctx_.users, lockout = ctx_.lockout, user, password, listener, address, policy] {
        return verify_on_pool(*users, lockout.get(), user, password, listener, address, policy);
    };
    auto ex = co_await net::asio::this_coro::executor;
    auto got = co_await ctx_.pool->run<verdict>(ex, std::move(job));
    if (!got) {
        r.overloaded = true;
        r.refusal = "overloaded";
        co_return finish(std::move(r));
    }
    r.refusal = got->refusal;
    if (got->ok) {
        keep_current();  // the pool may have read a newer store
        if (got->generation == generation_) {
            if (cache_.size() > 10000) cache_.clear();
            cache_[k] = std::chrono::steady_clock::now() + std::chrono::minutes(5);
        }
        r.ok = true;
        r.user = user;
        r.groups = std::move(got->groups);
    }
    co_return finish(std::move(r));
}

rules::fault auth_overloaded_fault(const std::string& user) {
    return rules::make_fault(rules::fault_class::overloaded, 503,
                             "too many password checks are waiting" + (user.empty() ? std::string() : " (user '" + user + "')") +
                                 "; try again shortly");
}

}  // namespace dmz::proxy
