#include "auth/authenticator.hpp"

#include <openssl/sha.h>
#include <sys/stat.h>

#include <iostream>

#include "metrics.hpp"

namespace dmz::proxy {

authenticator::result authenticator::check(const std::string& user, const std::string& password, const std::string& listener,
                                           const std::string& address, const rules::lockout_policy& policy) {
    refresh();
    result r;
    if (!store_) {
        r.refusal = "no user store";
        return r;
    }
    std::string key = user + ":" + password;
    unsigned char digest[SHA256_DIGEST_LENGTH];
    SHA256(reinterpret_cast<const unsigned char*>(key.data()), key.size(), digest);
    std::string k(reinterpret_cast<char*>(digest), sizeof digest);
    auto now = std::chrono::steady_clock::now();
    auto it = cache_.find(k);
    bool cached = it != cache_.end() && it->second > now;
    bool ok = cached;
    if (cached && lockout_ && lockout_->any()) {
        // A locked-out user is refused even with a password that worked a minute ago:
        // otherwise guessing could go on past the lockout once the right one was cached.
        r.refusal = lockout_->refused(listener, user, address, policy);
        ok = r.refusal.empty();
    }
    if (!ok && !cached) {
        // A locked-out user gets the same answer, after the same work, as a wrong password.
        r.refusal = lockout_ ? lockout_->refused(listener, user, address, policy) : "";
        bool good = store_->verify(user, password);
        ok = good && r.refusal.empty();
        if (ok) {
            if (cache_.size() > 10000) cache_.clear();
            cache_[k] = now + std::chrono::minutes(5);
            if (lockout_) lockout_->succeeded(listener, user);
        } else if (r.refusal.empty()) {
            // Only a real bad password counts: attempts refused by the lockout itself do not
            // extend it (the user retrying must not lock themselves out for longer).
            r.refusal = store_->find(user) ? "bad password" : "unknown user";
            if (lockout_) lockout_->failed(listener, user, address, policy);
        }
    }
    auto* u = store_->find(user);
    if (ok && u) {
        r.ok = true;
        r.user = user;
        r.groups = u->groups;
    }
    if (!r.ok && stats_) stats_->auth_failed(r.refusal.empty() ? std::string("refused") : r.refusal);
    return r;
}

void authenticator::refresh() {
    if (path_.empty()) return;
    auto now = std::chrono::steady_clock::now();
    if (store_ && now - checked_ < std::chrono::seconds(1)) return;
    checked_ = now;
    struct stat st {};
    std::int64_t m = ::stat(path_.c_str(), &st) == 0 ? static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec : 0;
    if (store_ && m == mtime_) return;
    try {
        store_ = std::make_unique<user_store>(user_store::load(path_));
        mtime_ = m;
        cache_.clear();  // a removed user or a new password takes effect at once
    } catch (const std::exception& e) {
        std::cerr << "dmzproxy: user store " << path_ << ": " << e.what() << " (keeping the previous one)\n";
    }
}

}  // namespace dmz::proxy
