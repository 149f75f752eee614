// dmzproxy check -c CONFIG | -t TOPOLOGY [--json] [--quiet]
#include <iostream>
#include <memory>

#include "commands.hpp"
#include "dmz/certs/lint.hpp"
#include "dmz/rules/config.hpp"
#include "dmz/rules/lint.hpp"
#include "dmz/topology/topology.hpp"
#include "output.hpp"

namespace dmz::cli {

namespace {
struct check_options {
    std::string config, topology;
    bool json = false, quiet = false;
};

int finish(const check_options& o, const rules::diagnostics& d, bool parsed,
           const std::vector<const rules::instance_config*>& configs, const std::string& subject) {
    int errors = 0, warnings = 0;
    for (auto& x : d) {
        if (x.level == rules::severity::error) ++errors;
        if (x.level == rules::severity::warning) ++warnings;
    }
    int code = !parsed ? 2 : errors ? 1 : 0;
    if (o.json) {
        nlohmann::json inst = nlohmann::json::array();
        for (auto* c : configs) inst.push_back(rules_json(*c));
        nlohmann::json out = {{"subject", subject}, {"ok", code == 0}, {"parsed", parsed}, {"errors", errors},
                              {"warnings", warnings}, {"findings", diagnostics_json(d)}, {"instances", inst}};
        std::cout << out.dump(2) << "\n";
        return code;
    }
    if (!o.quiet && parsed)
        for (auto* c : configs) {
            print_rules(std::cout, *c);
            std::cout << "\n";
        }
    print_diagnostics(std::cout, d);
    std::cout << "check: " << subject << ": " << errors << " error" << (errors == 1 ? "" : "s") << ", " << warnings
              << " warning" << (warnings == 1 ? "" : "s") << (parsed ? "" : " (could not be parsed)") << "\n";
    return code;
}
}  // namespace

command add_check(CLI::App& app) {
    auto o = std::make_shared<check_options>();
    auto* sub = app.add_subcommand("check", "Validate and lint an instance config or a whole topology (exit 1 on errors)");
    auto* c = sub->add_option("-c,--config", o->config, "instance config (TOML)");
    auto* t = sub->add_option("-t,--topology", o->topology, "topology (TOML): checks every instance and the links between them");
    c->excludes(t);
    sub->add_flag("--json", o->json, "print findings and expanded rules as JSON");
    sub->add_flag("-q,--quiet", o->quiet, "print only the findings, not the expanded rules");
    return [o]() -> int {
        if (o->config.empty() && o->topology.empty()) {
            std::cerr << "dmzproxy check: give -c CONFIG or -t TOPOLOGY\n";
            return 2;
        }
        if (!o->config.empty()) {
            auto res = rules::load_instance_config(o->config);
            std::vector<const rules::instance_config*> cfgs;
            bool schema_ok = !rules::has_errors(res.diags);
            if (res.config && schema_ok) {
                rules::lint(*res.config, res.diags);
                certs::lint(*res.config, res.diags);
            }
            if (res.config) cfgs.push_back(&*res.config);
            return finish(*o, res.diags, res.parsed, cfgs, o->config);
        }
        auto res = topology::load(o->topology);
        std::vector<const rules::instance_config*> cfgs;
        if (res.topo) {
            if (!rules::has_errors(res.diags)) topology::lint(*res.topo, res.diags);
            for (auto& in : res.topo->instances)
                if (in.policy) cfgs.push_back(&in.policy->config());
        }
        return finish(*o, res.diags, res.parsed, cfgs, o->topology);
    };
}

}  // namespace dmz::cli
