#pragma once
/// @file Running one instance: listeners, worker threads, until SIGINT or SIGTERM.
#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "dmz/rules/evaluate.hpp"

namespace dmz::proxy {

struct run_options {
    unsigned threads = 0;     ///< 0: one per core
    std::string access_log;   ///< a file, "-" for standard output, "" for none
    std::string state_dir;    ///< where lab certificates live (topology instances)
    /// SIGTERM: how long requests in flight may take to finish before the process stops.
    std::chrono::milliseconds drain_timeout{10000};
    /// "ADDRESS:PORT" of the admin endpoint, overriding [instance] admin ("" keeps it).
    std::string admin;
    /// What the config came from, for log lines ("front-end.toml").
    std::string source;
    /// SIGHUP: loads and checks the config again. Null, with the reason in `why` (errors at
    /// file:line:column), keeps the running config.
    std::function<std::shared_ptr<const rules::policy>(std::string& why)> reload;
};

/// Binds every listener, then serves until SIGINT/SIGTERM. Returns the exit code. Throws
/// std::runtime_error (naming the address, port or file) when it cannot start.
int run_instance(std::shared_ptr<const rules::policy> policy, const run_options& opts);

}  // namespace dmz::proxy
