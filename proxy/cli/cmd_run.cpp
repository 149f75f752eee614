// dmzproxy run -c CONFIG | -t TOPOLOGY --instance NAME [--threads N] [--access-log PATH]
#include <iostream>
#include <memory>

#include "commands.hpp"
#include "dmz/proxy/run.hpp"
#include "dmz/rules/config.hpp"
#include "dmz/rules/lint.hpp"
#include "dmz/topology/topology.hpp"
#include "output.hpp"

namespace dmz::cli {

namespace {
struct run_cli {
    std::string config, topology, instance, access_log;
    unsigned threads = 0;
};

/// Load errors stop the start; lint warnings are printed and the instance runs.
int refuse_start(const rules::diagnostics& d, bool parsed) {
    print_diagnostics(std::cerr, d);
    std::cerr << "dmzproxy run: the config has errors; nothing was started\n";
    return parsed ? 1 : 2;
}
}  // namespace

command add_run(CLI::App& app) {
    auto o = std::make_shared<run_cli>();
    auto* sub = app.add_subcommand("run", "Run one instance in the foreground until SIGINT or SIGTERM");
    auto* c = sub->add_option("-c,--config", o->config, "instance config (TOML)");
    auto* t = sub->add_option("-t,--topology", o->topology, "topology (TOML); needs --instance");
    c->excludes(t);
    sub->add_option("--instance", o->instance, "which instance of the topology to run")->needs(t);
    sub->add_option("--threads", o->threads, "worker threads (default: one per core)");
    sub->add_option("--access-log", o->access_log, "access log file, or - for standard output (default: none)");
    return [o]() -> int {
        std::shared_ptr<const rules::policy> policy;
        if (!o->config.empty()) {
            auto res = rules::load_instance_config(o->config);
            if (!res.config || rules::has_errors(res.diags)) return refuse_start(res.diags, res.parsed);
            print_diagnostics(std::cerr, res.diags);
            policy = std::make_shared<rules::policy>(std::move(*res.config));
        } else if (!o->topology.empty()) {
            if (o->instance.empty()) {
                std::cerr << "dmzproxy run: -t needs --instance NAME\n";
                return 2;
            }
            auto res = topology::load(o->topology);
            if (!res.topo || rules::has_errors(res.diags)) return refuse_start(res.diags, res.parsed);
            auto* in = res.topo->find_instance(o->instance);
            if (!in || !in->policy) {
                std::cerr << "dmzproxy run: no instance '" << o->instance << "' in " << o->topology << "\n";
                return 2;
            }
            policy = in->policy;
        } else {
            std::cerr << "dmzproxy run: give -c CONFIG or -t TOPOLOGY --instance NAME\n";
            return 2;
        }
        rules::diagnostics lint;
        rules::lint(policy->config(), lint);
        print_diagnostics(std::cerr, lint);
        proxy::run_options ro;
        ro.threads = o->threads;
        ro.access_log = o->access_log;
        try {
            return proxy::run_instance(policy, ro);
        } catch (const std::exception& e) {
            std::cerr << "dmzproxy run: " << policy->config().name << ": " << e.what() << "\n";
            return 1;
        }
    };
}

}  // namespace dmz::cli
