#include <algorithm>
#include <functional>
#include <map>
#include <set>

#include "dmz/certs/certs.hpp"
#include "dmz/certs/lint.hpp"
#include "dmz/rules/lint.hpp"
#include "dmz/topology/topology.hpp"

namespace dmz::topology {

using rules::severity;

namespace {
void add(diagnostics& out, severity s, const char* code, const source_location& where, std::string key,
         std::string msg, std::string hint = {}) {
    out.push_back({s, code, where, std::move(key), std::move(msg), std::move(hint)});
}

bool rule_serves(const rules::rule& r, const rules::listener* l, const std::string& name) {
    if (r.kind != rules::rule_kind::web || !r.enabled || r.act != rules::action::allow || !r.to || !r.to->tls) return false;
    if (l && !r.listeners.empty() && std::find(r.listeners.begin(), r.listeners.end(), l->name) == r.listeners.end()) return false;
    return r.public_names.empty() ||
           std::any_of(r.public_names.begin(), r.public_names.end(), [&](auto& p) { return rules::host_matches(p, name); });
}

/// The hosts a request for `name` reaches over TLS from rule `r`, through later tiers too.
void hosts_reached(const topology& t, const rules::rule& r, const std::string& name, int depth, std::set<const host*>& out) {
    if (depth > 8) return;  // a loop is TOP002's business
    if (auto* h = t.find_host(r.to->host)) out.insert(h);
    auto* next = t.find_instance(r.to->instance);
    if (!next || !next->policy) return;
    for (auto& nr : next->policy->config().rules)
        if (rule_serves(nr, nullptr, name)) hosts_reached(t, nr, name, depth + 1, out);
}

/// The SHA-256 of a certificate entry's leaf, "" when it does not load (CERT0xx says why).
std::string fingerprint(const rules::certificate& c, diagnostics* out, const std::string& key) {
    auto loaded = certs::load_key_pair({c.cert_file, c.key_file, c.password_file}, false);
    if (loaded.pair) return certs::describe(loaded.pair->leaf.get()).sha256;
    if (out) {
        auto& e = *loaded.error;
        auto where = e.role == certs::file_role::password ? c.password_where : e.role == certs::file_role::key ? c.key_where : c.cert_where;
        add(*out, severity::error, e.problem == certs::load_problem::bad_password ? "CERT002" : "CERT001", where, key, e.message, e.hint);
    }
    return {};
}

/// Exchange with Extended Protection checks that the client saw Exchange's own certificate
/// (the channel binding of NTLM and Kerberos): the tier terminating the client's TLS must
/// present it (CSS-Exchange issues 1151 and 1463, HAProxy issue 1828).
void extended_protection(const topology& t, diagnostics& out) {
    std::map<const host*, std::string> host_fp;
    for (auto& h : t.hosts)
        if (h.certificate && !h.certificate->cert_file.empty())
            host_fp[&h] = fingerprint(*h.certificate, &out, "hosts." + h.name + ".certificate");
    std::set<std::string> told;
    for (auto& entry : t.names) {
        const auto& name = entry.first;  // not a structured binding: the lambda below captures it
        auto* in = t.find_instance(entry.second);
        if (!in || !in->policy) continue;
        for (auto& l : in->policy->config().listeners) {
            if (l.proto != rules::protocol::https) continue;
            for (std::size_t i = 0; i < l.certificates.size(); ++i) {
                auto& c = l.certificates[i];
                if (std::none_of(c.names.begin(), c.names.end(), [&](auto& n) { return rules::host_matches(n, name); })) continue;
                std::set<const host*> reached;
                auto windows_auth = l.auth == rules::auth_mode::none || l.auth == rules::auth_mode::pass_through;
                for (auto& r : in->policy->config().rules)
                    if (rule_serves(r, &l, name) && r.delegate.value_or(windows_auth ? rules::delegation::pass_through : rules::delegation::basic) ==
                                                        rules::delegation::pass_through)
                        hosts_reached(t, r, name, 0, reached);
                for (auto* h : reached) {
                    auto it = host_fp.find(h);
                    if (!h->extended_protection || it == host_fp.end() || it->second.empty()) continue;
                    auto key = "instances." + in->name + ".listeners." + l.name + ".certificates[" + std::to_string(i) + "]";
                    auto mine = c.lab ? std::string() : fingerprint(c, nullptr, key);
                    if ((!c.lab && mine.empty()) || mine == it->second || !told.insert(key + "|" + h->name).second) continue;
                    add(out, severity::warning, "EXCH004", c.lab ? c.where : c.cert_where, key,
                        "Extended Protection: clients reach '" + name + "' through listener '" + l.name + "' of '" + in->name + "', whose " +
                            (c.lab ? std::string("lab-issued certificate") : "certificate (SHA-256 " + mine.substr(0, 23) + "...)") +
                            " is not Exchange host '" + h->name + "''s (SHA-256 " + it->second.substr(0, 23) +
                            "...): NTLM and Kerberos through the bridge fail with 401 (Outlook, EWS, ActiveSync with Negotiate)",
                        "give this listener Exchange's own certificate and key for '" + name +
                            "': $c = Export-ExchangeCertificate -Thumbprint T -BinaryEncoded -Password (Get-Credential).Password; "
                            "[IO.File]::WriteAllBytes('mail.pfx', $c.FileData) (or the MMC, with the private key), then cert = \"mail.pfx\", "
                            "password_file = \"mail.pfx.pass\". Turning Extended Protection off instead (extended_protection = false "
                            "describes that) opens Exchange to NTLM relay");
                }
            }
        }
    }
}

}  // namespace

void lint(const topology& t, diagnostics& out) {
    for (auto& in : t.instances)
        if (in.policy) {
            rules::lint(in.policy->config(), out);
            certs::lint(in.policy->config(), out);
        }

    // Two services of one host on one port: the seed's FrontEnd and Hub transport both on 25.
    for (auto& h : t.hosts)
        for (std::size_t i = 0; i < h.services.size(); ++i)
            for (std::size_t j = 0; j < i; ++j)
                if (h.services[i].port == h.services[j].port)
                    add(out, severity::error, "TOP001", h.services[i].where, "hosts." + h.name + ".services",
                        "host '" + h.name + "': services '" + h.services[j].name + "' and '" + h.services[i].name +
                            "' both listen on " + h.address.to_string() + ":" + std::to_string(h.services[i].port),
                        "on a multi-role Exchange server FrontEnd transport owns 25 and Hub transport 2525; "
                        "a receive connector created with the wrong TransportRole takes 25 twice "
                        "(Set-ReceiveConnector -TransportRole FrontEndTransport)");

    // A host believes XCLIENT only from an instance on its own network.
    for (auto& h : t.hosts)
        for (auto& x : h.xclient_from) {
            auto* in = t.find_instance(x);
            if (!in || !in->address_on(h.network))
                add(out, severity::error, "TOP009", h.xclient_from_where, "hosts." + h.name + ".xclient_from",
                    "host '" + h.name + "' believes XCLIENT from '" + x + "', which is " +
                        (in ? "not on network " + h.network : std::string("no instance of this topology")),
                    "name the publishing instance that hands mail to this host (usually the back-end)");
        }

    // Public names must land on a leg on External.
    for (auto& [name, node] : t.names) {
        auto* in = t.find_instance(node);
        bool external = in ? in->address_on(rules::external_network).has_value()
                           : (t.find_host(node) && t.find_host(node)->network == rules::external_network);
        if (!external)
            add(out, severity::warning, "TOP007", t.name_where.at(name), "names." + name,
                "public name '" + name + "' points to '" + node + "', which has no address on External",
                "clients on the Internet will not reach it; point it at the front-end");
    }

    // Targets: something must listen there, with the right name on its certificate.
    std::map<std::string, std::set<std::string>> edges;
    for (auto& in : t.instances) {
        if (!in.policy) continue;
        for (auto& r : in.policy->config().rules) {
            if (!r.enabled && !r.test) continue;
            if (!r.to || !r.to->address || r.act != rules::action::allow) continue;
            auto& to = *r.to;
            auto key = "rules." + r.name + ".target";
            auto where = to.where;
            if (!to.instance.empty()) {
                if (r.enabled) edges[in.name].insert(to.instance);
                auto* other = t.find_instance(to.instance);
                if (!other || !other->policy) continue;
                auto* l = other->policy->config().listener_at(*to.address, to.port);
                if (!l) {
                    add(out, severity::error, "TOP006", where, key,
                        "rule '" + r.name + "' of '" + in.name + "' targets " + to.describe() + ", but no listener of '" +
                            to.instance + "' binds that address and port",
                        "add a listener on the shared network, or fix the port");
                    continue;
                }
                bool web_rule = r.kind == rules::rule_kind::web;
                if (web_rule && (l->proto == rules::protocol::https) != to.tls)
                    add(out, severity::error, "TOP008", where, key + ".tls",
                        "rule '" + r.name + "' speaks " + (to.tls ? "https" : "http") + " to listener '" + l->name + "' of '" +
                            to.instance + "', which is " + rules::to_string(l->proto));
                if (to.tls && l->proto == rules::protocol::https) {
                    bool covered = false;
                    for (auto& cert : l->certificates)
                        for (auto& n : cert.names) covered = covered || rules::host_matches(n, to.name);
                    if (!covered)
                        add(out, severity::warning, "TLS001", where, key + ".name",
                            "rule '" + r.name + "' verifies name '" + to.name + "', which is not on the certificates of listener '" +
                                l->name + "' of '" + to.instance + "'",
                            "the name also needs to be on the trusted certificate of the next hop");
                }
            } else if (!to.host.empty()) {
                auto* h = t.find_host(to.host);
                if (!h) continue;
                auto* s = h->service_at(to.port);
                if (!s) {
                    add(out, severity::error, "TOP006", where, key,
                        "rule '" + r.name + "' targets " + to.describe() + ", but host '" + h->name + "' has no service on port " +
                            std::to_string(to.port));
                    continue;
                }
                if (to.tls && std::none_of(h->names.begin(), h->names.end(), [&](auto& n) { return rules::host_matches(n, to.name); }))
                    add(out, severity::warning, "TLS001", where, key + ".name",
                        "rule '" + r.name + "' verifies name '" + to.name + "', which is not among the names of host '" + h->name + "'",
                        "the name also needs to be on the trusted certificate on the Exchange server");
                if (r.kind == rules::rule_kind::server && s->role == "hub")
                    add(out, severity::warning, "TOP005", where, key + ".port",
                        "rule '" + r.name + "' sends SMTP to '" + s->name + "' (Hub transport, port " + std::to_string(s->port) +
                            "); mail from outside belongs on FrontEnd transport",
                        "target port 25 (FrontEnd transport); 2525 is for Exchange servers talking among themselves");
            }
        }
    }

    // Publishing loops: a chain of instances that comes back to itself (TMG error 12206).
    std::set<std::string> reported;
    for (auto& in : t.instances) {
        std::vector<std::string> stack;
        std::function<bool(const std::string&)> dfs = [&](const std::string& n) -> bool {
            auto pos = std::find(stack.begin(), stack.end(), n);
            if (pos != stack.end()) {
                stack.erase(stack.begin(), pos);
                return true;
            }
            stack.push_back(n);
            auto it = edges.find(n);
            if (it != edges.end())
                for (auto& next : it->second)
                    if (dfs(next)) return true;
            stack.pop_back();
            return false;
        };
        if (!dfs(in.name)) continue;
        auto members = std::set<std::string>(stack.begin(), stack.end());
        auto sig = std::string();
        for (auto& m : members) sig += m + ",";
        if (!reported.insert(sig).second) continue;
        std::string chain;
        for (auto& s : stack) chain += s + " -> ";
        chain += stack.front();
        auto* first = t.find_instance(stack.front());
        add(out, severity::error, "TOP002", first ? first->where : source_location{t.file, 0, 0}, "instances." + stack.front(),
            "publishing loop: " + chain + " (a request would pass the same proxy twice, TMG error 12206)",
            "each tier must publish toward the Exchange host, never back toward an earlier tier");
    }

    extended_protection(t, out);

    // A scenario's list of deliberate errors must name errors it has.
    for (auto& listed : t.broken_on_purpose) {
        const std::string& code = listed.first;  // not a structured binding: clang 14 cannot capture one
        bool found = std::any_of(out.begin(), out.end(), [&](const rules::diagnostic& d) {
            return d.code == code && d.level == severity::error;
        });
        if (!found)
            add(out, severity::warning, "TOP010", listed.second, "topology.broken_on_purpose",
                "broken_on_purpose lists " + code + ", but this topology has no such error",
                "remove it: a fixed scenario should not start with its faults waved through");
    }
}

}  // namespace dmz::topology
