// dmzproxy explain -t TOPOLOGY --from IP [--user U] [--method M] [--with-test-rule] [--json] URL
// dmzproxy explain -t TOPOLOGY --from IP smtp[:SERVER[:PORT]] --mail-from A --rcpt B
#include <iostream>
#include <memory>

#include <filesystem>

#include "commands.hpp"
#include "dmz/proxy/users.hpp"
#include "dmz/topology/explain.hpp"
#include "output.hpp"

namespace dmz::cli {

namespace {
struct explain_options {
    std::string topology, from, user, method = "GET", mail_from, rcpt, what, users_file = "lab-state/users.toml";
    bool json = false, with_test_rule = false;
};
}  // namespace

command add_explain(CLI::App& app) {
    auto o = std::make_shared<explain_options>();
    auto* sub = app.add_subcommand("explain", "Offline: the decision at each tier for one request or mail (exit 0 allowed, 1 denied)");
    sub->add_option("-t,--topology", o->topology, "topology (TOML)")->required();
    sub->add_option("--from", o->from, "client address, e.g. 127.10.0.100 (its network follows from the topology)")->required();
    sub->add_option("--user", o->user, "evaluate as this authenticated user (default: anonymous)");
    sub->add_option("--users-file", o->users_file, "user store for --user's groups (default: lab-state/users.toml if present)");
    sub->add_option("--method,-X", o->method, "HTTP method (default GET)");
    sub->add_option("--mail-from", o->mail_from, "SMTP envelope sender");
    sub->add_option("--rcpt", o->rcpt, "SMTP envelope recipient");
    sub->add_flag("--with-test-rule", o->with_test_rule, "evaluate as if each tier's test rule were enabled");
    sub->add_flag("--json", o->json, "print the explanation as JSON");
    sub->add_option("what", o->what, "URL (https://mail.contoso.com/owa/), or smtp:RECIPIENT, or smtp / smtp:SERVER[:PORT] with --rcpt")->required();
    return [o]() -> int {
        auto p = make_probe("explain", o->what, o->from, o->method, o->mail_from, o->rcpt);
        p.user = o->user;
        p.with_test_rules = o->with_test_rule;
        if (!p.user.empty() && std::filesystem::exists(o->users_file)) {
            auto store = proxy::user_store::load(o->users_file);
            if (auto* u = store.find(p.user)) p.groups = u->groups;
            else std::cerr << "dmzproxy explain: note: '" << p.user << "' is not in " << o->users_file << "\n";
        }
        auto res = topology::load(o->topology);
        if (!res.topo || rules::has_errors(res.diags)) {
            print_diagnostics(std::cerr, res.diags);
            std::cerr << "dmzproxy explain: the topology has errors; run 'dmzproxy check -t " << o->topology << "'\n";
            return 2;
        }
        auto ex = topology::explain(*res.topo, p);
        if (o->json)
            std::cout << explanation_json(p, ex).dump(2) << "\n";
        else
            print_explanation(std::cout, p, *res.topo, ex);
        return ex.allowed() ? 0 : 1;
    };
}

}  // namespace dmz::cli
