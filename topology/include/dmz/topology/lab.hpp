#pragma once
/// @file The lab: a topology's instances and simulated hosts as real processes on their
/// 127.x addresses, started, watched and stopped by pid.
#include <functional>
#include <string>
#include <vector>

namespace dmz::topology {

struct lab_options {
    std::string topology;        ///< the topology file
    std::string state = "lab-state";
    bool detach = false;         ///< return once everything listens
    std::string dmzproxy;        ///< this executable, to start instances with
    std::string hosts_program;   ///< the simulated Exchange host (topology/hosts/exchange_host.py)
    int ready_timeout_s = 20;
    int shift = 0; ///< move every address this many /16 blocks up (load_settings::shift)
    /// Sets a user's password and groups in a user store file (the composition root passes
    /// the proxy's user store; the lab puts its demo user in every instance's store).
    std::function<void(const std::string& store, const std::string& user, const std::string& password,
                       const std::vector<std::string>& groups)>
        set_user;
};

/// Starts the lab. Returns the exit code; throws std::runtime_error with a clear message
/// (a port taken by whom, a missing program) when it cannot start.
int lab_up(const lab_options& o);
/// Prints what runs (from STATE/lab.json, with each pid checked). Exit 1 when nothing runs.
int lab_status(const std::string& state, bool json);
/// Stops everything the lab started (SIGTERM, then SIGKILL after 5 s) and forgets it.
int lab_down(const std::string& state);

}  // namespace dmz::topology
