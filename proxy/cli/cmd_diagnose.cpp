// dmzproxy diagnose [-t TOPOLOGY] [--from IP] [--state DIR] [--json] URL | smtp[:SERVER] --rcpt B
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "dmz/topology/diagnose.hpp"
#include "output.hpp"

namespace dmz::cli {

namespace {
struct diagnose_cli {
    std::string topology, from, state = "lab-state", method = "GET", mail_from, rcpt, what, user;
    bool json = false;
};
}  // namespace

command add_diagnose(CLI::App& app) {
    auto o = std::make_shared<diagnose_cli>();
    auto* sub = app.add_subcommand("diagnose", "Live: probe each hop of the running lab and say whether the network or a rule stops it (exit 0 only when ok)");
    sub->add_option("-t,--topology", o->topology, "topology (default: the one the lab runs)");
    sub->add_option("--from", o->from, "client address (default: the External network's client_address)");
    sub->add_option("--state", o->state, "lab state folder (default: lab-state)");
    sub->add_option("--method,-X", o->method, "HTTP method (default GET)");
    sub->add_option("--mail-from", o->mail_from, "SMTP envelope sender");
    sub->add_option("--rcpt", o->rcpt, "SMTP envelope recipient");
    sub->add_option("-u,--user", o->user, "USER:PASSWORD sent as Basic credentials (pre-authenticating front-ends)");
    sub->add_flag("--json", o->json, "as JSON");
    sub->add_option("what", o->what, "URL, or smtp:RECIPIENT, or smtp / smtp:SERVER[:PORT] with --rcpt")->required();
    return [o]() -> int {
        std::ifstream f(o->state + "/lab.json");
        if (!f) {
            std::cerr << "dmzproxy diagnose: no lab is running from " << o->state << " (start one with 'dmzproxy lab up --detach')\n";
            return 2;
        }
        auto lab = nlohmann::json::parse(f, nullptr, false);
        if (lab.is_discarded()) throw std::runtime_error(o->state + "/lab.json is not valid JSON");
        bool mapped = lab.value("ports_mapped", false);
        auto topo_file = o->topology.empty() ? lab.value("topology", std::string()) : o->topology;
        topology::load_settings ls{o->state, mapped, lab.value("shift", 0)};
        auto res = topology::load(topo_file, ls);
        if (!res.topo || rules::has_errors(res.diags)) {
            print_diagnostics(std::cerr, res.diags);
            return 2;
        }
        std::string from = o->from;
        if (from.empty())
            for (auto& n : res.topo->networks)
                if (n.name == rules::external_network && n.client_address) from = n.client_address->to_string();
        auto p = make_probe("diagnose", o->what, from, o->method, o->mail_from, o->rcpt);
        if (!o->user.empty()) {
            auto colon = o->user.find(':');
            p.user = o->user.substr(0, colon);
            if (colon != std::string::npos) p.password = o->user.substr(colon + 1);
        }
        auto d = topology::diagnose(*res.topo, p, lab.value("ca_file", std::string()), mapped);
        std::string line = d.verdict == "ok"              ? "OK"
                           : d.verdict == "network-fault" ? "NETWORK FAULT at " + d.hop
                           : d.verdict == "rule-fault"    ? "RULE FAULT at " + d.tier
                                                          : "AUTH FAULT at " + d.tier;
        if (o->json) {
            nlohmann::json hops = nlohmann::json::array();
            for (auto& h : d.hops)
                hops.push_back({{"from", h.hop.from}, {"to", h.hop.to}, {"source", h.hop.source.to_string()},
                                {"address", h.hop.address.to_string()}, {"port", h.hop.port}, {"tcp", h.tcp},
                                {"tls", h.tls.empty() ? nlohmann::json(nullptr) : nlohmann::json(h.tls)},
                                {"certificate_names", h.tls_detail}, {"rule", h.rule}, {"action", h.action}});
            nlohmann::json out = {{"verdict", d.verdict}, {"tier", d.tier.empty() ? nlohmann::json(nullptr) : nlohmann::json(d.tier)},
                                  {"hop", d.hop.empty() ? nlohmann::json(nullptr) : nlohmann::json(d.hop)}, {"reason", d.reason},
                                  {"summary", line}, {"status", d.status}, {"response", d.response}, {"hops", hops},
                                  {"test_rules", d.test_rules}, {"note", d.note}, {"offline", explanation_json(p, d.offline)}};
            std::cout << out.dump(2) << "\n";
        } else {
            for (auto& h : d.hops) {
                std::cout << "hop " << h.hop.from << " -> " << h.hop.to << ": " << h.hop.source.to_string() << " -> "
                          << h.hop.address.to_string() << ":" << h.hop.port << "  TCP " << h.tcp;
                if (!h.tls.empty()) std::cout << "  TLS " << h.tls << (h.tls_detail.empty() ? "" : " [" + h.tls_detail + "]");
                if (!h.rule.empty()) std::cout << "  rule " << h.rule << " (" << h.action << ")";
                std::cout << "\n";
            }
            if (d.status)
                std::cout << "response: " << (p.smtp ? d.response : std::to_string(d.status) + (d.response.empty() ? "" : " " + d.response)) << "\n";
            std::cout << line << " (" << d.reason << ")\n";
            if (!d.test_rules.empty()) std::cout << "  " << d.test_rules << "\n";
            if (!d.note.empty()) std::cout << "  note: " << d.note << "\n";
        }
        return d.verdict == "ok" ? 0 : 1;
    };
}

}  // namespace dmz::cli
