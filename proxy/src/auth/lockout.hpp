#pragma once
// Soft lockout: failure counts per user and per client address, shared by the workers of
// one instance.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>

#include "dmz/rules/model.hpp"

namespace dmz::proxy {

/// Failure counts shared by the workers of one instance. Touched only when a password is
/// really checked (a cache miss) or fails, never on the cached path of a good login.
class lockout_table {
public:
    /// Why a check must fail without looking at the password, or "".
    std::string refused(const std::string& listener, const std::string& user, const std::string& address,
                        const rules::lockout_policy& p);
    /// The address part alone: an address past its threshold is refused before any work
    /// (no password check runs for it: one address must not keep the check pool busy).
    std::string address_refused(const std::string& listener, const std::string& address, const rules::lockout_policy& p);
    void failed(const std::string& listener, const std::string& user, const std::string& address, const rules::lockout_policy& p);
    void succeeded(const std::string& listener, const std::string& user);
    /// Whether any failure is on record (lets good logins skip the lock when there is none).
    bool any() const { return entries_.load(std::memory_order_relaxed) != 0; }

private:
    std::string address_refused_locked(const std::string& listener, const std::string& address, const rules::lockout_policy& p,
                                       std::chrono::steady_clock::time_point now) const;
    std::atomic<std::size_t> entries_{0};
    struct entry {
        std::uint32_t count = 0;
        std::chrono::steady_clock::time_point last{};
    };
    std::mutex m_;
    std::unordered_map<std::string, entry> users_, addresses_;
};

}  // namespace dmz::proxy
