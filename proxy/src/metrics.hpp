#pragma once
// Counters for the admin endpoint's /metrics and /status. One set per worker, written by
// its own thread under an uncontended mutex, read (and summed) by the admin endpoint.
#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "access_log.hpp"

namespace dmz::proxy {

struct metrics {
    /// Upper bounds (seconds) of the request-duration histogram's buckets.
    static constexpr std::array<double, 11> buckets{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30};

    struct counts {
        /// HTTP requests by "rule\0action\0status class\0fault class".
        std::map<std::string, std::uint64_t> requests;
        std::uint64_t bytes_in = 0, bytes_out = 0;  ///< from clients / to clients
        std::array<std::uint64_t, buckets.size() + 1> latency{};
        double latency_sum = 0;
        std::uint64_t latency_count = 0;
        std::map<std::string, std::int64_t> active;  ///< open connections by listener
        std::uint64_t smtp_accepted = 0, smtp_refused = 0, smtp_relay_denied = 0;
        std::map<std::string, std::uint64_t> auth_failures;  ///< by reason
        std::uint64_t lockouts = 0;  ///< attempts refused because of a lockout
        std::map<std::string, std::uint64_t> rule_hits;  ///< HTTP and SMTP, by rule
        std::int64_t pool_idle = 0;  ///< idle upstream connections, as of the last request
        std::int64_t parked = 0;     ///< idle client connections in the parking lot
        /// Faults of HTTP and SMTP transactions by protocol, class and side.
        std::map<std::tuple<std::string, rules::fault_class, rules::fault_side>, std::uint64_t> faults;

        void add(const counts& o);
    };

    /// Whether anything reads these counters (an admin endpoint). Set before the workers
    /// run; when false, every call below returns at once (the request path pays nothing).
    bool on = false;

    /// One finished transaction (the access record, built whether or not it is logged).
    void observe(const access_record& r, std::int64_t pool_idle = -1);
    void connection(const std::string& listener, int delta);
    void auth_failed(const std::string& reason);
    void parked(int delta);
    /// An exception escaped a session of `protocol` ("http", "smtp", "admin").
    void escaped(const char* protocol);

    counts snapshot() const {
        std::lock_guard lock(m_);
        return c_;
    }

private:
    mutable std::mutex m_;
    counts c_;
    std::string key_;  ///< reused for the request key (no allocation per request)
};

}  // namespace dmz::proxy
