#include "dmz/topology/explain.hpp"

#include <algorithm>
#include <set>
#include <stdexcept>

#include "dmz/proxy/smtp/replies.hpp"
#include "dmz/rules/path.hpp"

namespace dmz::topology {

const char* to_string(outcome o) {
    switch (o) {
    case outcome::ok: return "ok";
    case outcome::rule_fault: return "rule-fault";
    case outcome::network_fault: return "network-fault";
    case outcome::auth_fault: return "auth-fault";
    }
    return "?";
}

namespace {

struct parsed_url {
    std::string scheme, host, target;
    std::uint16_t port = 0;
};

std::uint16_t parse_port(const std::string& s) {
    if (s.empty() || s.size() > 5 || !std::all_of(s.begin(), s.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); }))
        throw std::invalid_argument("'" + s + "' is not a port");
    int p = std::stoi(s);
    if (p < 1 || p > 65535) throw std::invalid_argument("port " + s + " is out of range");
    return static_cast<std::uint16_t>(p);
}

void split_host_port(std::string hp, std::string& host, std::uint16_t& port) {
    if (!hp.empty() && hp.front() == '[') {
        auto close = hp.find(']');
        if (close == std::string::npos) throw std::invalid_argument("unclosed '[' in '" + hp + "'");
        host = hp.substr(1, close - 1);
        if (close + 1 < hp.size()) {
            if (hp[close + 1] != ':') throw std::invalid_argument("bad authority '" + hp + "'");
            port = parse_port(hp.substr(close + 2));
        }
        return;
    }
    auto colon = hp.rfind(':');
    if (colon != std::string::npos) {
        port = parse_port(hp.substr(colon + 1));
        hp = hp.substr(0, colon);
    }
    host = rules::to_lower(hp);
}

parsed_url parse_url(const std::string& url) {
    parsed_url u;
    auto sep = url.find("://");
    if (sep == std::string::npos) throw std::invalid_argument("'" + url + "' is not a URL (want https://name/path)");
    u.scheme = rules::to_lower(url.substr(0, sep));
    if (u.scheme != "http" && u.scheme != "https")
        throw std::invalid_argument("scheme '" + u.scheme + "' is not http or https");
    auto rest = url.substr(sep + 3);
    auto slash = rest.find_first_of("/?");
    auto authority = rest.substr(0, slash);
    u.target = slash == std::string::npos ? "/" : rest.substr(slash);
    if (!u.target.empty() && u.target.front() == '?') u.target = "/" + u.target;
    if (authority.find('@') != std::string::npos) throw std::invalid_argument("user info in the URL is not supported");
    split_host_port(authority, u.host, u.port);
    if (u.host.empty()) throw std::invalid_argument("no host in '" + url + "'");
    if (u.port == 0) u.port = u.scheme == "https" ? 443 : 80;
    return u;
}

struct hop_state {
    std::string node;          ///< instance or host reached
    ip_address address;        ///< address:port connected to
    std::uint16_t port = 0;
    rules::protocol proto;
    ip_address transport_source;
    ip_address client;         ///< original client
    bool client_forwarded = false;
    std::string host;          ///< Host header
    std::string sni;
    std::string via;           ///< previous tier's name
};

std::string addr_port(const ip_address& a, std::uint16_t port) {
    auto s = a.to_string();
    return (a.is_v4() ? s : "[" + s + "]") + ":" + std::to_string(port);
}

explanation run(const topology& t, const probe& p, bool with_test_rules, bool map) {
    explanation ex;
    auto net_fault = [&](std::string where, std::string why) {
        ex.result = outcome::network_fault;
        ex.stopped_at = std::move(where);
        ex.reason = std::move(why);
        return ex;
    };

    parsed_url u;
    if (p.smtp) {
        std::string server = p.smtp_server.empty() ? t.mx : p.smtp_server;
        if (server.empty()) throw std::invalid_argument("no SMTP server given and the topology names no mx");
        u.scheme = "smtp";
        u.port = 25;
        split_host_port(server, u.host, u.port);
    } else {
        u = parse_url(p.url);
    }

    // Name resolution, as the client on its network would see it.
    std::string client_net = t.network_of(p.from);
    hop_state h;
    h.client = p.from;
    h.transport_source = p.from;
    h.port = u.port;
    h.host = u.host;
    h.proto = u.scheme == "smtp" ? rules::protocol::smtp : u.scheme == "https" ? rules::protocol::https : rules::protocol::http;
    if (auto lit = ip_address::parse(u.host)) {
        h.address = *lit;
        h.node = t.node_at(*lit);
        if (h.node.empty()) return net_fault("client", "no instance or host has address " + lit->to_string() + " (no route, TMG 10065)");
    } else {
        auto it = t.names.find(u.host);
        if (it == t.names.end())
            return net_fault("client", "the name '" + u.host + "' does not resolve in this topology (host not found, TMG 11001)");
        h.node = it->second;
        std::optional<ip_address> a;
        if (auto* in = t.find_instance(h.node)) a = in->address_on(client_net);
        else if (auto* ho = t.find_host(h.node); ho && ho->network == client_net) a = ho->address;
        if (!a)
            return net_fault("client", "'" + u.host + "' resolves to '" + h.node + "', which has no address on the client's network " +
                                           client_net + " (no route, TMG 10065)");
        h.address = *a;
    }
    if (h.proto == rules::protocol::https) h.sni = h.host;
    h.port = mapped_port(h.port, map);

    std::set<std::string> visited;
    std::string previous = "client";
    while (true) {
        auto hop_name = previous + " -> " + h.node;
        ex.hops.push_back({previous, h.node, h.transport_source, h.address, h.port, h.proto, h.sni, h.host});
        if (auto* ho = t.find_host(h.node)) {
            auto* s = ho->service_at(h.port);
            if (!s)
                return net_fault(hop_name, "nothing listens on " + addr_port(h.address, h.port) + " at host '" + ho->name +
                                               "' (connection refused, TMG 10061)");
            if ((s->proto == rules::protocol::smtp) != (h.proto == rules::protocol::smtp))
                return net_fault(hop_name, "host '" + ho->name + "' speaks " + rules::to_string(s->proto) + " on port " +
                                               std::to_string(h.port) + ", the previous hop speaks " + rules::to_string(h.proto));
            if (h.proto == rules::protocol::https && s->proto == rules::protocol::http)
                return net_fault(hop_name, "TLS handshake failure: host '" + ho->name + "' speaks plain http on port " + std::to_string(h.port));
            if (h.proto == rules::protocol::http && s->proto == rules::protocol::https)
                return net_fault(hop_name, "host '" + ho->name + "' expects TLS on port " + std::to_string(h.port) + "; the previous hop sent plain http");
            if (h.proto == rules::protocol::https &&
                std::none_of(ho->names.begin(), ho->names.end(), [&](auto& n) { return rules::host_matches(n, h.sni); }))
                return net_fault(hop_name, "TLS name mismatch: host '" + ho->name + "' has no certificate for '" + h.sni +
                                               "' (its names: " + [&] { std::string s2; for (auto& n : ho->names) s2 += (s2.empty() ? "" : ", ") + n; return s2; }() + ")");
            ex.result = outcome::ok;
            ex.reached = ho->name;
            ex.arrival = "'" + ho->name + "' sees the connection from " + h.transport_source.to_string();
            if (h.client_forwarded && !(h.client == h.transport_source))
                ex.arrival += std::string(h.proto == rules::protocol::smtp ? "; Exchange speaks no PROXY protocol, so this tier is the SMTP client"
                                                                            : "; X-Forwarded-For: " + h.client.to_string());
            if (h.proto != rules::protocol::smtp) ex.arrival += "; Host " + h.host + (h.sni.empty() ? "" : ", SNI " + h.sni);
            ex.reason = "reaches " + s->name + " on host '" + ho->name + "' at " + addr_port(h.address, h.port);
            return ex;
        }
        auto* in = t.find_instance(h.node);
        if (!in) return net_fault(hop_name, "unknown node '" + h.node + "'");
        if (!visited.insert(in->name).second) {
            ex.result = outcome::rule_fault;
            ex.stopped_at = in->name;
            ex.reason = "publishing loop: the request reaches '" + in->name + "' a second time (TMG error 12206)";
            return ex;
        }
        if (!in->policy) return net_fault(hop_name, "instance '" + in->name + "' has no usable config");
        auto& pol = *in->policy;
        auto& cfg = pol.config();
        auto* l = cfg.listener_at(h.address, h.port);
        if (!l)
            return net_fault(hop_name, "nothing listens on " + addr_port(h.address, h.port) + " at '" + in->name +
                                           "' (connection refused, TMG 10061)");
        bool l_web = l->proto != rules::protocol::smtp;
        bool h_web = h.proto != rules::protocol::smtp;
        if (l_web != h_web || (l_web && l->proto != h.proto)) {
            if (l->proto == rules::protocol::http && h.proto == rules::protocol::https)
                return net_fault(hop_name, "TLS handshake failure: listener '" + l->name + "' of '" + in->name + "' is plain http");
            return net_fault(hop_name, "listener '" + l->name + "' of '" + in->name + "' speaks " + rules::to_string(l->proto) +
                                           ", the client speaks " + rules::to_string(h.proto));
        }
        if (h.proto == rules::protocol::https) {
            bool covered = false;
            for (auto& c : l->certificates)
                for (auto& n : c.names) covered = covered || rules::host_matches(n, h.sni);
            if (!covered && previous != "client")
                return net_fault(hop_name, "TLS name mismatch: listener '" + l->name + "' of '" + in->name + "' has no certificate for '" + h.sni + "'");
        }
        if (l->proto == rules::protocol::http && l->redirect_to_https && previous == "client" && !p.smtp) {
            // Answered by the listener itself; explain what the browser does next.
            auto target = "https://" + u.host + u.target;
            ex.redirect = "listener '" + l->name + "' of '" + in->name + "' answers 301 to " + target;
            probe next = p;
            next.url = target;
            auto inner = run(t, next, with_test_rules, map);
            inner.redirect = ex.redirect;
            return inner;
        }

        tier_result tr;
        tr.instance = in->name;
        tr.role = in->role;
        tr.address = addr_port(h.address, h.port);
        tr.listener = l->name;
        tr.transport_source = h.transport_source.to_string();
        rules::facts f;
        f.listener = l->name;
        if (previous == "client" || !h.client_forwarded) {
            f.client = h.transport_source;
            tr.client_note = previous == "client" ? "connection" : "connection (no forwarded address)";
        } else if (pol.trusts_forwarding_from(h.transport_source)) {
            f.client = h.client;
            tr.client_note = std::string(h.proto == rules::protocol::smtp ? "PROXY protocol v2" : "X-Forwarded-For") +
                             " from trusted " + h.via;
        } else {
            f.client = h.transport_source;
            tr.client_note = "connection (forwarded address from " + h.via + " ignored: not in trust_forwarded_from)";
        }
        tr.client = f.client->to_string();
        if (p.user.empty()) {
            f.who = rules::identity::anonymous;
        } else {
            f.who = rules::identity::authenticated;
            f.user = p.user;
            if (p.groups) f.groups = *p.groups;
            else
                for (auto& usr : cfg.users)
                    if (usr.name == p.user) f.groups = usr.groups;
        }
        if (h_web) {
            f.host = h.host;
            if (!h.sni.empty()) f.sni = h.sni;
            f.method = p.method;
            f.target = u.target;
            tr.host = h.host;
            tr.sni = h.sni;
        } else {
            f.mail_from = p.mail_from;
            if (!p.rcpt.empty()) f.rcpt = p.rcpt;
        }
        rules::evaluate_options eo;
        eo.enable_test_rules = with_test_rules;
        auto d = pol.evaluate(f, eo);
        tr.path = d.path.path;
        tr.matched_rule = d.rule_name;
        tr.action = d.result == rules::verdict::allow ? "allow" : "deny";
        tr.decision = d;
        auto* to = d.to();
        if (to) tr.target = to->describe();
        ex.tiers.push_back(tr);

        if (d.result != rules::verdict::allow) {
            ex.result = d.why == rules::fault_class::auth_required ? outcome::auth_fault : outcome::rule_fault;
            ex.stopped_at = in->name;
            // SMTP words a refused recipient as the tier would answer it.
            ex.reason = !h_web && f.rcpt ? smtp::recipient_refusal(d) : d.reason;
            return ex;
        }
        if (!to->address) return net_fault(in->name, "rule '" + d.rule_name + "' has no resolved target address");

        // The next hop: this instance connects from its leg on the target's network.
        auto target_net = t.network_of(*to->address);
        auto src = in->address_on(target_net);
        auto next_node = t.node_at(*to->address);
        auto next_hop = in->name + " -> " + (next_node.empty() ? to->address->to_string() : next_node);
        if (!src)
            return net_fault(next_hop, "'" + in->name + "' has no leg on network " + target_net + " where " +
                                           to->address->to_string() + " lives (no route, TMG 10065)");
        if (next_node.empty())
            return net_fault(next_hop, "nothing has address " + to->address->to_string() + " (connection timed out, TMG 10060)");
        hop_state n;
        n.node = next_node;
        n.address = *to->address;
        n.port = to->port;
        n.transport_source = *src;
        n.client = f.client ? *f.client : h.client;
        n.client_forwarded = to->client_policy == rules::client_address::forwarded;
        n.via = in->name;
        if (h_web) {
            n.proto = to->tls ? rules::protocol::https : rules::protocol::http;
            n.host = to->host_policy == rules::host_header::target && !to->name.empty() ? to->name : h.host;
            n.sni = to->tls ? (to->name.empty() ? n.host : to->name) : "";
        } else {
            n.proto = rules::protocol::smtp;
        }
        previous = in->name;
        h = n;
    }
}

}  // namespace

explanation explain(const topology& t, const probe& p, bool map_privileged_ports) {
    auto ex = run(t, p, p.with_test_rules, map_privileged_ports);
    if (!p.with_test_rules && ex.result == outcome::rule_fault) {
        auto alt = run(t, p, true, map_privileged_ports);
        ex.with_test_rules = alt.result;
        ex.with_test_rules_reached = alt.reached;
        ex.with_test_rules_reason = alt.result == outcome::ok ? alt.reason : (alt.stopped_at + ": " + alt.reason);
    }
    return ex;
}

}  // namespace dmz::topology
