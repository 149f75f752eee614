// dmzproxy run -c CONFIG | -t TOPOLOGY --instance NAME [--threads N] [--access-log PATH]
#include <iostream>
#include <memory>
#include <sstream>

#include "commands.hpp"
#include "dmz/certs/certs.hpp"
#include "dmz/certs/lint.hpp"
#include "dmz/proxy/run.hpp"
#include "dmz/rules/config.hpp"
#include "dmz/rules/lint.hpp"
#include "dmz/topology/topology.hpp"
#include "output.hpp"

namespace dmz::cli {

namespace {
struct run_cli {
    std::string config, topology, instance, access_log, state = "lab-state", admin;
    unsigned threads = 0;
    double drain_timeout = 10;
    bool map_ports = false;
    int shift = 0;
};

/// Listeners with `issuer = "lab"` get their certificates from the lab CA, made on first use.
void ensure_lab_certificates(const rules::instance_config& c, const std::string& state) {
    bool any = false;
    for (auto& l : c.listeners)
        for (auto& cert : l.certificates) any = any || cert.lab;
    if (!any) return;
    auto ca = certs::open_or_make_ca(state + "/pki");
    for (auto& l : c.listeners)
        for (auto& cert : l.certificates)
            if (cert.lab) certs::issue_leaf(ca, cert.names, state + "/pki", c.name + "-" + l.name);
}

/// The instance config file, checked as `check -c` checks it: any error (schema or lint)
/// refuses it. Null with the errors (file:line:column) in `why`; warnings go to standard error.
std::shared_ptr<const rules::policy> load_config_file(const run_cli& o, std::string& why, bool& parsed) {
    auto res = rules::load_instance_config(o.config);
    parsed = res.parsed;
    if (res.config && !rules::has_errors(res.diags)) {
        rules::lint(*res.config, res.diags);
        certs::lint(*res.config, res.diags);
    }
    if (!res.config || rules::has_errors(res.diags)) {
        std::ostringstream msg;
        print_diagnostics(msg, res.diags);
        why = msg.str();
        return nullptr;
    }
    print_diagnostics(std::cerr, res.diags);
    return rules::compile(std::move(*res.config));
}

/// The instance derived from the topology, checked as `check -t` checks the topology: an
/// error refuses it unless the topology lists its code in `broken_on_purpose`. Null with the
/// reason in `why`; this instance's own warnings (and the faults on purpose) go to standard error.
std::shared_ptr<const rules::policy> load_from_topology(const run_cli& o, std::string& why, bool& parsed) {
    topology::load_settings ls;
    ls.state_dir = o.state;
    ls.map_privileged_ports = o.map_ports;
    ls.shift = o.shift;
    auto res = topology::load(o.topology, ls);
    parsed = res.parsed;
    if (res.topo && !rules::has_errors(res.diags)) topology::lint(*res.topo, res.diags);
    auto stop = res.topo ? topology::blocking(*res.topo, res.diags) : res.diags;
    if (!res.topo || !stop.empty()) {
        std::ostringstream msg;
        print_diagnostics(msg, stop);
        why = msg.str();
        return nullptr;
    }
    auto* in = res.topo->find_instance(o.instance);
    if (!in || !in->policy) {
        why = "no instance '" + o.instance + "' in " + o.topology + "\n";
        parsed = false;
        return nullptr;
    }
    rules::diagnostics own;
    rules::lint(in->policy->config(), own);
    certs::lint(in->policy->config(), own);
    for (auto& d : res.diags)
        if (res.topo->on_purpose(d)) own.push_back(d);
    print_diagnostics(std::cerr, own);
    return in->policy;
}

/// One loader for the start and for every reload (SIGHUP): the config file, or the
/// instance derived again from the topology. Errors go to `why` (file:line:column);
/// `parsed` says whether the file was TOML at all.
std::shared_ptr<const rules::policy> load_policy(const run_cli& o, std::string& why, bool& parsed) {
    auto policy = o.config.empty() ? load_from_topology(o, why, parsed) : load_config_file(o, why, parsed);
    if (!policy) return nullptr;
    if (!o.topology.empty()) ensure_lab_certificates(policy->config(), o.state);
    return policy;
}

proxy::run_options run_options_of(std::shared_ptr<const run_cli> o) {
    proxy::run_options ro;
    ro.threads = o->threads;
    ro.access_log = o->access_log;
    ro.drain_timeout = std::chrono::milliseconds(static_cast<long long>(o->drain_timeout * 1000));
    ro.admin = o->admin;
    ro.source = o->config.empty() ? o->topology + " (instance " + o->instance + ")" : o->config;
    ro.reload = [o](std::string& reason) -> std::shared_ptr<const rules::policy> {
        bool toml = true;
        try {
            return load_policy(*o, reason, toml);
        } catch (const std::exception& e) {
            reason = e.what();
            return nullptr;
        }
    };
    return ro;
}

int run(std::shared_ptr<const run_cli> o) {
    if (o->config.empty() && o->topology.empty()) {
        std::cerr << "dmzproxy run: give -c CONFIG or -t TOPOLOGY --instance NAME\n";
        return 2;
    }
    if (!o->topology.empty() && o->instance.empty()) {
        std::cerr << "dmzproxy run: -t needs --instance NAME\n";
        return 2;
    }
    std::string why;
    bool parsed = true;
    std::shared_ptr<const rules::policy> policy;
    try {
        policy = load_policy(*o, why, parsed);
    } catch (const std::exception& e) {
        std::cerr << "dmzproxy run: " << e.what() << "\n";
        return 1;
    }
    if (!policy) {
        std::cerr << why;
        if (why.rfind("no instance", 0) == 0) return 2;
        std::cerr << "dmzproxy run: the config has errors; nothing was started\n";
        return parsed ? 1 : 2;
    }
    try {
        return proxy::run_instance(policy, run_options_of(o));
    } catch (const std::exception& e) {
        std::cerr << "dmzproxy run: " << policy->config().name << ": " << e.what() << "\n";
        return 1;
    }
}

}  // namespace


command add_run(CLI::App& app) {
    auto o = std::make_shared<run_cli>();
    auto* sub = app.add_subcommand(
        "run", "Run one instance in the foreground (SIGHUP reloads the config, SIGTERM drains, SIGUSR1 reopens the access log)");
    auto* c = sub->add_option("-c,--config", o->config, "instance config (TOML)");
    auto* t = sub->add_option("-t,--topology", o->topology, "topology (TOML); needs --instance");
    c->excludes(t);
    sub->add_option("--instance", o->instance, "which instance of the topology to run")->needs(t);
    sub->add_option("--threads", o->threads, "worker threads (default: one per core)");
    sub->add_option("--access-log", o->access_log, "access log file, or - for standard output (default: none)");
    sub->add_option("--state", o->state, "topology: lab state folder holding lab certificates (default: lab-state)");
    sub->add_option("--drain-timeout", o->drain_timeout,
                    "SIGTERM: seconds for requests in flight to finish before stopping (default 10)")
        ->check(CLI::Range(0.0, 86400.0));
    sub->add_option("--admin", o->admin, "ADDRESS:PORT of the admin endpoint (/metrics, /status, /reload), overriding [instance] admin");
    sub->add_flag("--map-ports", o->map_ports, "topology: run privileged ports P < 1024 on 10000 + P (for labs without root)");
    sub->add_option(
           "--shift", o->shift,
           "topology: move every address N /16 blocks up inside 127.0.0.0/8 (as lab up --shift)")
        ->check(CLI::Range(0, 255));
    return [o]() -> int { return run(o); };
}

}  // namespace dmz::cli
