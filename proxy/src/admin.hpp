#pragma once
// The admin endpoint of one instance: GET /metrics (Prometheus text), GET /status (JSON),
// POST /reload, POST /probe, GET /log (the live log view) and GET /log/events (its data). Loopback by default; with a token file, every request must carry
// "Authorization: Bearer <token>". Served by the first worker, one request per connection.
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "runtime.hpp"

namespace dmz::proxy {

/// How many probes an instance still runs: `burst` in a row, `per_second` more each second,
/// at most `max_in_flight` at once. Used by the admin endpoint's thread only (no lock).
struct probe_budget {
    int burst = 10;
    double per_second = 1.0;
    int max_in_flight = 2;
    int in_flight = 0;
    /// Takes one probe's worth, or says after how long to ask again.
    bool take(std::chrono::steady_clock::time_point now, std::chrono::seconds& retry_after);

private:
    double tokens_ = 10;
    std::chrono::steady_clock::time_point last_{};
};

struct admin_view {
    std::vector<std::unique_ptr<worker>>* workers = nullptr;
    const std::shared_ptr<const instance_runtime>* current = nullptr;  ///< the latest snapshot
    const int* version = nullptr;
    const bool* draining = nullptr;
    std::string source;
    std::chrono::system_clock::time_point started;
    const std::chrono::system_clock::time_point* loaded = nullptr;  ///< when the config in use was loaded
    std::string token;  ///< "" when no token is required
    const access_log* log = nullptr;  ///< its recent lines feed /log/events
    /// Reloads like SIGHUP: (true, "config version N") or (false, why).
    std::function<std::pair<bool, std::string>()> reload;
    std::shared_ptr<probe_budget> probes = std::make_shared<probe_budget>();
};

struct probe_answer {
    int status = 200;
    std::string json;   ///< the body
    std::string extra;  ///< more header lines (Retry-After)
};

/// POST /probe?rule=NAME: connects to that rule's next hop as a request would (its source
/// address, TLS name and CA; the real connect path) and reports the result, the source
/// address used and the certificate's names. 404 for a rule the running config lacks, 422
/// for one with no next hop, 429 past the budget.
net::task<probe_answer> run_probe(worker& w, const admin_view& v, std::string_view query);

/// The Prometheus exposition of the instance's counters (summed over the workers).
std::string render_metrics(const admin_view& v);
/// The /status document.
std::string render_status(const admin_view& v);

/// Listens on `at` with the first worker's io_context. Throws (naming the address) when it
/// cannot bind. `view` must outlive the io_context's run.
void start_admin(worker& w, const rules::bind_endpoint& at, const admin_view& view);

}  // namespace dmz::proxy
