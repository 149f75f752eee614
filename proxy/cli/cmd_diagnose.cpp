// dmzproxy diagnose [-t TOPOLOGY] [--from IP] [--state DIR] [--ca-file F] [--json] URL | smtp[:SERVER] --rcpt B
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "dmz/topology/diagnose.hpp"
#include "output.hpp"

namespace dmz::cli {

namespace {
struct diagnose_cli {
    std::string topology, from, state = "lab-state", method = "GET", mail_from, rcpt, what, user, ca_file;
    bool json = false;
};

/// Where to ask each instance for its probes: its admin URL and token.
struct admin_of {
    std::string url, token, token_error;
};

/// A deployment's instances name their admin endpoints in their configs ([instance] admin,
/// admin_token_file). A lab starts each instance with --admin, which overrides the config:
/// there lab.json says where they are.
std::map<std::string, admin_of> admin_endpoints(const topology::topology& t, const nlohmann::json& lab) {
    std::map<std::string, admin_of> out;
    for (auto& in : t.instances) {
        if (!in.policy || !in.policy->config().admin) continue;
        auto& a = out[in.name];
        a.url = "http://" + in.policy->config().admin->to_string();
        auto& file = in.policy->config().admin_token_file;
        if (!file.empty() && !read_token_file(file, a.token)) a.token_error = "cannot read its admin_token_file " + file;
    }
    if (lab.is_object() && lab.contains("instances"))
        for (auto& in : lab["instances"])
            if (in.contains("admin")) out[in.value("name", std::string())].url = in["admin"].get<std::string>();
    return out;
}

/// Asks an instance to probe its next hop for a rule (POST /probe?rule=...).
topology::remote_probe ask_instance(const admin_of& a, const std::string& rule) {
    topology::remote_probe r;
    if (!a.token_error.empty()) {
        r.error = a.token_error;
        return r;
    }
    std::string q;
    for (unsigned char c : rule) {
        if (std::isalnum(c) || c == '-' || c == '_' || c == '.') q += static_cast<char>(c);
        else {
            char b[4];
            std::snprintf(b, sizeof b, "%%%02X", c);
            q += b;
        }
    }
    auto reply = admin_call(a.url, "POST", "/probe?rule=" + q, a.token, 70);
    if (reply.status == 0) {
        r.error = reply.error;
        return r;
    }
    auto& b = reply.body;
    if (reply.status != 200 || !b.is_object()) {
        r.error = "HTTP " + std::to_string(reply.status) + (b.is_object() ? ": " + b.value("error", std::string()) : std::string());
        return r;
    }
    auto text = [&](const char* k) { return b.contains(k) && b[k].is_string() ? b[k].get<std::string>() : std::string(); };
    r.tcp = text("tcp"), r.tls = text("tls"), r.source = text("source"), r.address = text("address");
    r.port = b.value("port", 0);
    if (b.contains("certificate_names"))
        for (auto& n : b["certificate_names"]) r.names += (r.names.empty() ? "" : ", ") + n.get<std::string>();
    return r;
}

std::string summary_line(const topology::diagnosis& d) {
    return d.verdict == "ok"              ? "OK"
           : d.verdict == "network-fault" ? "NETWORK FAULT at " + d.hop
           : d.verdict == "rule-fault"    ? "RULE FAULT at " + d.tier
                                          : "AUTH FAULT at " + d.tier;
}

void print_json(const topology::diagnosis& d, const topology::probe& p, const std::string& line) {
    nlohmann::json hops = nlohmann::json::array();
    for (auto& h : d.hops)
        hops.push_back({{"from", h.hop.from}, {"to", h.hop.to}, {"source", h.hop.source.to_string()},
                        {"address", h.hop.address.to_string()}, {"port", h.hop.port}, {"tcp", h.tcp},
                        {"tls", h.tls.empty() ? nlohmann::json(nullptr) : nlohmann::json(h.tls)},
                        {"certificate_names", h.tls_detail}, {"rule", h.rule}, {"action", h.action},
                        {"probed_by", h.by.empty() ? nlohmann::json(nullptr) : nlohmann::json(h.by)}, {"probed", h.probed}});
    nlohmann::json out = {{"verdict", d.verdict}, {"tier", d.tier.empty() ? nlohmann::json(nullptr) : nlohmann::json(d.tier)},
                          {"hop", d.hop.empty() ? nlohmann::json(nullptr) : nlohmann::json(d.hop)}, {"reason", d.reason},
                          {"summary", line}, {"status", d.status}, {"response", d.response}, {"hops", hops},
                          {"test_rules", d.test_rules}, {"note", d.note}, {"offline", explanation_json(p, d.offline)}};
    std::cout << out.dump(2) << "\n";
}

void print_text(const topology::diagnosis& d, const topology::probe& p, const std::string& line) {
    for (auto& h : d.hops) {
        std::cout << "hop " << h.hop.from << " -> " << h.hop.to << ": " << h.hop.source.to_string() << " -> "
                  << h.hop.address.to_string() << ":" << h.hop.port << "  TCP " << h.tcp;
        if (!h.tls.empty()) std::cout << "  TLS " << h.tls << (h.tls_detail.empty() ? "" : " [" + h.tls_detail + "]");
        if (!h.rule.empty()) std::cout << "  rule " << h.rule << " (" << h.action << ")";
        if (!h.by.empty()) std::cout << "  [probed by " << h.by << "]";
        std::cout << "\n";
    }
    if (d.status)
        std::cout << "response: " << (p.smtp ? d.response : std::to_string(d.status) + (d.response.empty() ? "" : " " + d.response)) << "\n";
    std::cout << line << " (" << d.reason << ")\n";
    if (!d.test_rules.empty()) std::cout << "  " << d.test_rules << "\n";
    if (!d.note.empty()) std::cout << "  note: " << d.note << "\n";
}

/// Where the probes start and whom they ask: a lab's CA and client address, or a deployment's.
topology::diagnose_settings settings_for(const diagnose_cli& o, const topology::topology& t, const nlohmann::json& lab) {
    bool in_lab = lab.is_object();
    topology::diagnose_settings ds;
    ds.ca_file = !o.ca_file.empty() ? o.ca_file : in_lab ? lab.value("ca_file", std::string()) : std::string();
    ds.map_ports = in_lab && lab.value("ports_mapped", false);
    ds.bind_client = in_lab || !o.from.empty();
    auto admins = admin_endpoints(t, lab);
    ds.ask = [admins](const std::string& instance, const std::string& rule) -> std::optional<topology::remote_probe> {
        auto it = admins.find(instance);
        if (it == admins.end() || it->second.url.empty()) return std::nullopt;
        return ask_instance(it->second, rule);
    };
    return ds;
}
}  // namespace

command add_diagnose(CLI::App& app) {
    auto o = std::make_shared<diagnose_cli>();
    auto* sub = app.add_subcommand("diagnose", "Live: probe each hop of a running deployment (or lab) and say whether the network or a rule stops it (exit 0 only when ok)");
    sub->add_option("-t,--topology", o->topology, "topology (default: the one the lab in --state runs); its instances' admin endpoints probe their next hops");
    sub->add_option("--from", o->from, "client address (default: the External network's client_address)");
    sub->add_option("--state", o->state, "lab state folder (default: lab-state)");
    sub->add_option("--ca-file", o->ca_file, "trust for the hops probed from here (default: the lab CA in a lab, else the system's)");
    sub->add_option("--method,-X", o->method, "HTTP method (default GET)");
    sub->add_option("--mail-from", o->mail_from, "SMTP envelope sender");
    sub->add_option("--rcpt", o->rcpt, "SMTP envelope recipient");
    sub->add_option("-u,--user", o->user, "USER:PASSWORD sent as Basic credentials (pre-authenticating front-ends)");
    sub->add_flag("--json", o->json, "as JSON");
    sub->add_option("what", o->what, "URL, or smtp:RECIPIENT, or smtp / smtp:SERVER[:PORT] with --rcpt")->required();
    return [o]() -> int {
        // A lab (lab.json in --state), or any deployment named by -t.
        nlohmann::json lab;
        std::ifstream f(o->state + "/lab.json");
        if (f) {
            lab = nlohmann::json::parse(f, nullptr, false);
            if (lab.is_discarded()) throw std::runtime_error(o->state + "/lab.json is not valid JSON");
        } else if (o->topology.empty()) {
            std::cerr << "dmzproxy diagnose: no lab is running from " << o->state
                      << " (start one with 'dmzproxy lab up --detach'); for a deployment started with 'dmzproxy run', name its topology with -t\n";
            return 2;
        }
        bool in_lab = lab.is_object();
        bool mapped = in_lab && lab.value("ports_mapped", false);
        auto topo_file = o->topology.empty() ? lab.value("topology", std::string()) : o->topology;
        topology::load_settings ls{o->state, mapped, in_lab ? lab.value("shift", 0) : 0};
        auto res = topology::load(topo_file, ls);
        if (!res.topo || rules::has_errors(res.diags)) {
            print_diagnostics(std::cerr, res.diags);
            return 2;
        }
        std::string from = o->from;
        if (from.empty())
            for (auto& n : res.topo->networks)
                if (n.name == rules::external_network && n.client_address) from = n.client_address->to_string();
        if (from.empty()) {
            std::cerr << "dmzproxy diagnose: give --from ADDRESS (the client address the rules should see): the topology's External network has no client_address\n";
            return 2;
        }
        auto p = make_probe("diagnose", o->what, from, o->method, o->mail_from, o->rcpt);
        if (!o->user.empty()) {
            auto colon = o->user.find(':');
            p.user = o->user.substr(0, colon);
            if (colon != std::string::npos) p.password = o->user.substr(colon + 1);
        }
        auto d = topology::diagnose(*res.topo, p, settings_for(*o, *res.topo, lab));
        std::string line = summary_line(d);
        if (o->json) print_json(d, p, line);
        else print_text(d, p, line);
        return d.verdict == "ok" ? 0 : 1;
    };
}

}  // namespace dmz::cli
