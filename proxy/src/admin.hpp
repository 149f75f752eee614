#pragma once
// The admin endpoint of one instance: GET /metrics (Prometheus text), GET /status (JSON),
// POST /reload, GET /log (the live log view) and GET /log/events (its data). Loopback by default; with a token file, every request must carry
// "Authorization: Bearer <token>". Served by the first worker, one request per connection.
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "runtime.hpp"

namespace dmz::proxy {

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
};

/// The Prometheus exposition of the instance's counters (summed over the workers).
std::string render_metrics(const admin_view& v);
/// The /status document.
std::string render_status(const admin_view& v);

/// Listens on `at` with the first worker's io_context. Throws (naming the address) when it
/// cannot bind. `view` must outlive the io_context's run.
void start_admin(worker& w, const rules::bind_endpoint& at, const admin_view& view);

}  // namespace dmz::proxy
