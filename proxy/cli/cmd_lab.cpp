// dmzproxy lab up [TOPOLOGY] [--detach] [--shift N] | lab status [--json] | lab reload | lab down
// (--state DIR)
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "dmz/proxy/users.hpp"
#include "dmz/topology/lab.hpp"

namespace dmz::cli {

namespace fs = std::filesystem;

namespace {
struct lab_cli {
    std::string topology, state = "lab-state", scenario;
    bool detach = false, json = false;
    int shift = 0;
};

/// The source tree this binary was built from: topologies and the simulated host live there.
fs::path source_root() {
    std::error_code ec;
    auto exe = fs::read_symlink("/proc/self/exe", ec);
    for (auto dir = exe.parent_path(); !ec && dir.has_parent_path() && dir != dir.root_path(); dir = dir.parent_path())
        if (fs::exists(dir / "topology" / "hosts" / "exchange_host.py")) return dir;
    return DMZ_SOURCE_DIR;
}

/// lab reload: each instance's admin endpoint reloads it, back-ends first (as started).
int lab_reload(const lab_cli& o) {
    std::ifstream f(o.state + "/lab.json");
    auto st = nlohmann::json::parse(f, nullptr, false);
    if (!f || st.is_discarded()) {
        std::cerr << "dmzproxy lab reload: no lab is running from " << o.state << "\n";
        return 2;
    }
    int worst = 0;
    // Back-ends first, as they were started: a front-end's new rules may need them.
    auto instances = st.value("instances", nlohmann::json::array());
    for (auto& in : instances) {
        auto name = in.value("name", std::string("?"));
        if (!in.contains("admin")) {
            std::cerr << name << ": started without an admin endpoint (lab up again)\n";
            worst = std::max(worst, 2);
            continue;
        }
        std::string out, err;
        int rc = reload_instance(in["admin"].get<std::string>(), "", 60, out, err);
        if (rc == 0) std::cout << name << ": " << out << "\n";
        else std::cerr << name << ": " << err << (err.empty() || err.back() == '\n' ? "" : "\n");
        worst = std::max(worst, rc);
    }
    return worst;
}

/// The topology lab up starts: the one given, a scenario's, or the default. "" after a
/// usage error (said on standard error).
std::string lab_topology(const lab_cli& o, const fs::path& root) {
    if (o.scenario.empty()) return o.topology.empty() ? (root / "topology" / "exchange-two-tier.toml").string() : o.topology;
    if (!o.topology.empty()) {
        std::cerr << "dmzproxy lab up: give a topology or --scenario, not both\n";
        return "";
    }
    auto file = (root / "topology" / "scenarios" / "lab" / (o.scenario + ".toml")).string();
    if (!fs::exists(file)) {
        std::cerr << "dmzproxy lab up: no scenario '" << o.scenario << "' (" << file << ")\n";
        return "";
    }
    return file;
}

int lab_up(const lab_cli& o) {
    auto root = source_root();
    topology::lab_options lo;
    lo.topology = lab_topology(o, root);
    if (lo.topology.empty()) return 2;
    lo.state = o.state;
    lo.detach = o.detach;
    lo.shift = o.shift;
    lo.dmzproxy = fs::read_symlink("/proc/self/exe").string();
    lo.hosts_program = (root / "topology" / "hosts" / "exchange_host.py").string();
    lo.set_user = [](const std::string& store, const std::string& user, const std::string& password,
                     const std::vector<std::string>& groups) {
        auto dir = fs::path(store).parent_path();
        if (!dir.empty()) fs::create_directories(dir);
        auto s = proxy::user_store::load(store);
        s.set(user, password, groups);
        s.save(store);
    };
    try {
        return topology::lab_up(lo);
    } catch (const std::exception& e) {
        std::cerr << "dmzproxy lab up: " << e.what() << "\n";
        return 1;
    }
}
}  // namespace

command add_lab(CLI::App& app) {
    auto o = std::make_shared<lab_cli>();
    auto* sub = app.add_subcommand("lab", "The lab: a topology's tiers and simulated Exchange hosts as processes on 127.x");
    sub->require_subcommand(1);
    sub->add_option("--state", o->state, "lab state folder: certificates, logs, mail, lab.json (default: lab-state)");
    auto* up = sub->add_subcommand("up", "Start the lab (foreground with a live log; --detach to return once ready)");
    up->add_option("topology", o->topology, "topology file (default: topology/exchange-two-tier.toml)");
    up->add_flag("--detach", o->detach, "return once everything listens");
    up->add_option("--shift", o->shift,
                   "move every address of the topology N /16 blocks up inside 127.0.0.0/8 "
                   "(127.10.0.10 -> 127.(10+N).0.10), "
                   "to run beside another lab")
        ->check(CLI::Range(0, 255));
    up->add_option("--scenario", o->scenario,
                   "start a broken lab from topology/scenarios/lab/NAME.toml (host-https-down, back-end-not-on-dmz, "
                   "host-certificate-lacks-name, front-end-denies-activesync, only-test-rule-allows, open-relay, pre-authentication)");
    auto* status = sub->add_subcommand("status", "What runs, where (exit 1 when not all of it)");
    status->add_flag("--json", o->json, "as JSON");
    auto* down = sub->add_subcommand("down", "Stop everything the lab started");
    auto* reload = sub->add_subcommand("reload", "Re-derive every instance's config from the topology and reload it "
                                                 "(exit 1 when an instance refused, with its reason)");
    return [o, up, status, down, reload]() -> int {
        if (status->parsed()) return topology::lab_status(o->state, o->json);
        if (reload->parsed()) return lab_reload(*o);
        if (down->parsed()) return topology::lab_down(o->state);
        if (!up->parsed()) return 2;
        return lab_up(*o);
    };
}

}  // namespace dmz::cli
