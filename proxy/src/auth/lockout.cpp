#include "auth/lockout.hpp"

namespace dmz::proxy {

std::string lockout_table::address_refused(const std::string& listener, const std::string& address, const rules::lockout_policy& p) {
    if (!p.address_threshold) return "";
    auto now = std::chrono::steady_clock::now();
    std::lock_guard lock(m_);
    return address_refused_locked(listener, address, p, now);
}

std::string lockout_table::address_refused_locked(const std::string& listener, const std::string& address,
                                                  const rules::lockout_policy& p, std::chrono::steady_clock::time_point now) const {
    if (!p.address_threshold) return "";
    auto it = addresses_.find(listener + '\0' + address);
    if (it != addresses_.end() && it->second.count >= p.address_threshold && now - it->second.last < p.window)
        return "too many failures from " + address;
    return "";
}

std::string lockout_table::refused(const std::string& listener, const std::string& user, const std::string& address,
                                   const rules::lockout_policy& p) {
    auto now = std::chrono::steady_clock::now();
    std::lock_guard lock(m_);
    if (auto why = address_refused_locked(listener, address, p, now); !why.empty()) return why;
    if (p.threshold) {
        auto it = users_.find(listener + '\0' + user);
        if (it != users_.end() && it->second.count >= p.threshold && now - it->second.last < p.window) return "locked out";
    }
    return "";
}

void lockout_table::failed(const std::string& listener, const std::string& user, const std::string& address,
                           const rules::lockout_policy& p) {
    auto now = std::chrono::steady_clock::now();
    std::lock_guard lock(m_);
    if (users_.size() > 100000) users_.clear();  // bounded, whatever an attacker sends
    if (addresses_.size() > 100000) addresses_.clear();
    entries_.store(users_.size() + addresses_.size(), std::memory_order_relaxed);
    for (auto* e : {&users_[listener + '\0' + user], &addresses_[listener + '\0' + address]}) {
        if (now - e->last >= p.window) e->count = 0;  // a new observation window
        ++e->count;
        e->last = now;
    }
}

void lockout_table::succeeded(const std::string& listener, const std::string& user) {
    std::lock_guard lock(m_);
    users_.erase(listener + '\0' + user);
    entries_.store(users_.size() + addresses_.size(), std::memory_order_relaxed);
}

}  // namespace dmz::proxy
