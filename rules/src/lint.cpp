#include "dmz/rules/lint.hpp"

#include <algorithm>
#include <set>

#include "dmz/rules/evaluate.hpp"
#include "dmz/rules/path.hpp"

namespace dmz::rules {

namespace {

using namespace std::chrono_literals;

void add(diagnostics& out, severity s, const char* code, const source_location& where,
         std::string key, std::string msg, std::string hint = {}) {
    out.push_back({s, code, where, std::move(key), std::move(msg), std::move(hint)});
}

bool in_any_network(const instance_config& c, const cidr& r) {
    for (auto& n : c.networks)
        for (auto& nr : n.ranges)
            if (nr.contains(r)) return true;
    return false;
}

/// Whether a source holds External addresses at all, or more than 2^min_host_bits of them.
bool covers_external(const instance_config& c, const std::string& source, int min_host_bits = 0) {
    if (source == external_network) return true;
    if (c.find_network(source)) return false;
    auto* s = c.find_address_set(source);
    if (!s) return false;
    return std::any_of(s->ranges.begin(), s->ranges.end(), [&](const cidr& r) {
        return !in_any_network(c, r) && r.host_bits() >= min_host_bits;
    });
}

// A trusted previous tier or a relay host is a handful of addresses; a range this wide on
// External is "anyone".
constexpr int wide_external_bits = 8;

std::set<std::string> listener_networks(const instance_config& c, const listener& l) {
    std::set<std::string> out;
    for (auto& b : l.bind) {
        if (b.address.is_unspecified()) {
            out.insert(external_network);
            for (auto& n : c.networks) out.insert(n.name);
        } else {
            out.insert(c.network_of(b.address));
        }
    }
    return out;
}

bool binds_conflict(const bind_endpoint& a, const bind_endpoint& b) {
    if (a.port != b.port) return false;
    if (a.address == b.address) return true;
    // A wildcard takes the port on every address of its family (and v6 "::" on v4 too,
    // unless IPV6_V6ONLY): it collides with any specific address.
    if (a.address.is_unspecified() && (a.address.is_v4() == b.address.is_v4() || !a.address.is_v4())) return true;
    if (b.address.is_unspecified() && (a.address.is_v4() == b.address.is_v4() || !b.address.is_v4())) return true;
    return false;
}

std::vector<std::string> effective_listeners(const instance_config& c, const rule& r) {
    if (!r.listeners.empty()) return r.listeners;
    std::vector<std::string> out;
    for (auto& l : c.listeners) {
        bool web = l.proto != protocol::smtp;
        if (r.kind == rule_kind::access || (r.kind == rule_kind::web) == web) out.push_back(l.name);
    }
    return out;
}

bool source_covered(const instance_config& c, const std::string& a, const std::string& b) {
    if (a == b) return true;
    if (a == external_network) return false;
    auto ra = c.ranges_of(a);
    auto rb = c.ranges_of(b);
    if (!ra || !rb || rb->empty()) return false;
    return std::all_of(rb->begin(), rb->end(), [&](const cidr& x) {
        return std::any_of(ra->begin(), ra->end(), [&](const cidr& y) { return y.contains(x); });
    });
}

template <class T, class Pred>
bool all_covered(const std::vector<T>& a, const std::vector<T>& b, Pred covered) {
    // Empty means "any": a covers b when a is any, or every b item is covered by an a item.
    if (a.empty()) return true;
    if (b.empty()) return false;
    return std::all_of(b.begin(), b.end(), [&](const T& x) {
        return std::any_of(a.begin(), a.end(), [&](const T& y) { return covered(y, x); });
    });
}

bool users_covered(const rule& a, const rule& b) {
    bool a_any = a.users.empty() && a.groups.empty();
    if (a_any) return true;
    bool b_any = b.users.empty() && b.groups.empty();
    if (b_any) return false;
    if (std::find(a.users.begin(), a.users.end(), "*") != a.users.end()) return true;
    auto sub = [](auto& x, auto& y) {
        return std::all_of(y.begin(), y.end(), [&](auto& v) { return std::find(x.begin(), x.end(), v) != x.end(); });
    };
    return sub(a.users, b.users) && sub(a.groups, b.groups);
}

bool kinds_overlap_for_shadow(const rule& a, const rule& b) {
    if (a.kind == rule_kind::access) return true;
    return a.kind == b.kind;
}

/// Whether every transaction rule `b` matches is matched by earlier rule `a`.
bool shadows(const instance_config& c, const rule& a, const rule& b) {
    if (!kinds_overlap_for_shadow(a, b)) return false;
    auto la = effective_listeners(c, a), lb = effective_listeners(c, b);
    if (!all_covered(la, lb, [](auto& x, auto& y) { return x == y; }) || lb.empty()) return false;
    if (!all_covered(a.from, b.from, [&](auto& x, auto& y) { return source_covered(c, x, y); })) return false;
    if (!all_covered(a.public_names, b.public_names, [](auto& x, auto& y) {
            return x == y || (!y.starts_with("*.") && host_matches(x, y));
        }))
        return false;
    if (!all_covered(a.paths, b.paths, [](auto& x, auto& y) { return path_has_prefix(y, x); })) return false;
    if (!all_covered(a.methods, b.methods, [](auto& x, auto& y) { return x == y; })) return false;
    return users_covered(a, b);
}

bool matches_everything(const instance_config& c, const rule& r) {
    // Accepting mail from anywhere is what an MX does; relay policy still applies. Only a
    // web rule without conditions opens everything.
    if (r.kind != rule_kind::web) return false;
    if (!r.public_names.empty() || !r.paths.empty() || !r.methods.empty() || !r.users.empty() || !r.groups.empty())
        return false;
    if (!r.from.empty() &&
        std::none_of(r.from.begin(), r.from.end(), [](auto& s) { return s == external_network; }))
        return false;
    (void)c;
    return true;
}

std::string describe_source(const instance_config& c, const std::string& s) {
    if (s == external_network) return "External (every address no other network claims)";
    auto r = c.ranges_of(s);
    std::string out = s + " (";
    if (r)
        for (std::size_t i = 0; i < r->size(); ++i) out += (i ? ", " : "") + (*r)[i].to_string();
    return out + ")";
}

}  // namespace

std::vector<std::string> networks_of_source(const instance_config& c, const std::string& source) {
    std::set<std::string> out;
    if (source == external_network || c.find_network(source)) {
        out.insert(source);
    } else if (auto* s = c.find_address_set(source)) {
        for (auto& r : s->ranges) {
            bool inside = false;
            for (auto& n : c.networks)
                for (auto& nr : n.ranges) {
                    if (nr.contains(r)) inside = true;
                    if (nr.overlaps(r)) out.insert(n.name);
                }
            if (!inside) out.insert(external_network);
        }
    }
    return {out.begin(), out.end()};
}

namespace {
/// What to do about two listeners on one address and port, by what they speak.
std::string conflict_hint(const listener& a, const listener& b) {
    if (a.proto == protocol::smtp && b.proto == protocol::smtp)
        return "two SMTP services on one port work for a while and then lose connections; give each its own port "
               "(Exchange: FrontEnd transport on 25, Hub transport on 2525)";
    if (a.proto != b.proto)
        return "'" + a.name + "' speaks " + to_string(a.proto) + " and '" + b.name + "' " + to_string(b.proto) +
               ": one socket cannot serve both; give each its own port (http 80, https 443, smtp 25)";
    return "only one of them would get the connections; give each its own port or merge them into one listener";
}
}  // namespace

void lint(const instance_config& c, diagnostics& out) {
    if (c.listeners.empty())
        add(out, severity::error, "LST004", c.where.file.empty() ? source_location{c.file, 1, 1} : c.where, "listeners",
            "instance '" + c.name + "' has no listener: it would start and accept nothing",
            "add a [listeners.NAME] table with protocol and bind (see the README's example)");
    // Listeners sharing an address and port: the seed's two transport services on port 25.
    std::vector<std::pair<const listener*, const bind_endpoint*>> binds;
    for (auto& l : c.listeners)
        for (auto& b : l.bind) {
            for (auto& [ol, ob] : binds)
                if (binds_conflict(*ob, b))
                    add(out, severity::error, "LST001", b.where, "listeners." + l.name + ".bind",
                        "listener '" + l.name + "' binds " + b.to_string() + ", which listener '" + ol->name +
                            "' already holds with " + ob->to_string() + " (" + ob->where.to_string() + ")",
                        conflict_hint(*ol, l));
            binds.emplace_back(&l, &b);
        }
    for (auto& l : c.listeners)
        if (l.proto == protocol::https && l.default_certificate.empty() && l.certificates.size() > 1)
            add(out, severity::warning, "LST002", l.where, "listeners." + l.name + ".default_certificate",
                "https listener '" + l.name + "' has several certificates and no default_certificate",
                "clients without SNI (older ActiveSync devices) get the first certificate; name the right one");

    for (auto& l : c.listeners) {
        if (l.proto == protocol::http && (l.auth == auth_mode::basic || l.auth == auth_mode::forms) && !l.redirect_to_https)
            add(out, severity::warning, "AUTH004", l.where, "listeners." + l.name + ".authentication",
                "listener '" + l.name + "' takes passwords (authentication " + std::string(to_string(l.auth)) +
                    ") over plain http: they cross the network in the clear",
                "authenticate on an https listener, and let the http one redirect_to_https");
        if (l.auth == auth_mode::forms && l.session.idle > l.session.lifetime)
            add(out, severity::warning, "AUTH005", l.where, "listeners." + l.name + ".session.idle",
                "listener '" + l.name + "': the idle timeout is longer than the session lifetime, so it never applies",
                "make idle shorter than lifetime (defaults: 15 min idle, 8 h lifetime)");
    }

    for (auto& t : c.trust_forwarded_from)
        if (covers_external(c, t, wide_external_bits))
            add(out, severity::error, "TRUST001", c.trust_forwarded_from_where, "instance.trust_forwarded_from",
                "X-Forwarded-For and PROXY headers are trusted from '" + t + "', which includes External",
                "trust only the previous tier's addresses; anyone else could claim any client address");

    std::vector<const rule*> earlier;
    for (auto& r : c.rules) {
        auto key = "rules." + r.name;
        if (!r.enabled) continue;

        // Shadowing: an earlier enabled rule takes everything this one would match.
        for (auto* a : earlier) {
            if (!shadows(c, *a, r)) continue;
            bool differ = a->act != r.act;
            add(out, differ ? severity::error : severity::warning, "RULE001", r.where, key,
                "rule '" + r.name + "' never matches: earlier rule '" + a->name + "' (" + a->where.to_string() +
                    ") matches everything it does and " + (a->act == action::allow ? "allows" : "denies"),
                differ ? "move '" + r.name + "' above '" + a->name + "', or narrow '" + a->name + "'"
                       : "remove '" + r.name + "' or move it above '" + a->name + "'");
            break;
        }
        earlier.push_back(&r);

        if (r.test || (r.act == action::allow && matches_everything(c, r)))
            add(out, severity::error, "RULE003", r.where, key,
                r.test ? "test rule '" + r.name + "' is enabled"
                       : "rule '" + r.name + "' allows everything from everywhere",
                "a test rule is for telling a rule fault from a network fault; leave it disabled "
                "(dmzproxy explain --with-test-rule evaluates as if it were on)");

        // Reachability: the rule's sources must be able to reach one of its listeners, unless
        // the instance takes the client address from a trusted previous tier.
        if (!r.from.empty()) {
            bool any = false;
            for (auto& ln : effective_listeners(c, r)) {
                auto* l = c.find_listener(ln);
                if (!l) continue;
                auto lnets = listener_networks(c, *l);
                bool trusted_forwarding = false;
                for (auto& t : c.trust_forwarded_from)
                    for (auto& n : networks_of_source(c, t)) trusted_forwarding = trusted_forwarding || lnets.count(n);
                if (trusted_forwarding) any = true;
                for (auto& s : r.from)
                    for (auto& n : networks_of_source(c, s)) any = any || lnets.count(n);
            }
            if (!any && !effective_listeners(c, r).empty()) {
                std::string lnames;
                for (auto& ln : effective_listeners(c, r)) {
                    auto* l = c.find_listener(ln);
                    if (!l) continue;
                    lnames += (lnames.empty() ? "" : "; ") + ln + " on";
                    for (auto& n : listener_networks(c, *l)) lnames += " " + n;
                }
                add(out, severity::error, "RULE002", r.from_where, key + ".from",
                    "rule '" + r.name + "' can never match: none of its sources can reach its listeners (" + lnames + ")",
                    "add a listener on the sources' network, or trust the previous tier with instance.trust_forwarded_from");
            }
        }

        // Delegation must be able to work with the listener's authentication (TMG: "no
        // delegation, but client may authenticate directly" on an unauthenticated listener).
        if (r.kind == rule_kind::web && r.act == action::allow && r.delegate)
            for (auto& ln : effective_listeners(c, r)) {
                auto* l = c.find_listener(ln);
                if (!l) continue;
                bool validates = l->auth == auth_mode::basic || l->auth == auth_mode::forms;
                std::string why;
                if (*r.delegate == delegation::basic && !validates)
                    why = "delegates basic credentials, but listener '" + ln + "' (authentication " + to_string(l->auth) +
                          ") validates none";
                if (*r.delegate == delegation::pass_through && validates)
                    why = "passes the client's own authentication through, but listener '" + ln +
                          "' takes the client's credentials itself (authentication " + to_string(l->auth) + ")";
                if (!why.empty())
                    add(out, severity::error, "AUTH001", r.delegation_where.line ? r.delegation_where : r.where, key + ".delegation",
                        "rule '" + r.name + "' " + why,
                        "basic delegation needs a basic or forms listener; pass-through needs authentication = \"none\" or \"pass-through\"");
            }
        if ((!r.users.empty() || !r.groups.empty()) && r.kind == rule_kind::web)
            for (auto& ln : effective_listeners(c, r)) {
                auto* l = c.find_listener(ln);
                if (l && l->auth != auth_mode::basic && l->auth != auth_mode::forms)
                    add(out, severity::error, "AUTH002", r.users_where.line ? r.users_where : r.where, key + ".users",
                        "rule '" + r.name + "' requires users, but listener '" + ln + "' authenticates nobody (authentication " +
                            to_string(l->auth) + ")",
                        "set authentication = \"basic\" (or \"forms\") on the listener, with instance.user_store");
                if (l && (l->auth == auth_mode::basic || l->auth == auth_mode::forms) && c.user_store.empty())
                    add(out, severity::error, "AUTH003", l->where, "instance.user_store",
                        "listener '" + ln + "' authenticates users but the instance has no user_store",
                        "add user_store = \"users.toml\" under [instance] and manage it with 'dmzproxy users'");
            }

        if (r.to && r.to->address)
            for (auto& l : c.listeners)
                for (auto& b : l.bind)
                    if (b.port == r.to->port && b.address == *r.to->address)
                        add(out, severity::error, "RULE004", r.to->where, key + ".target",
                            "rule '" + r.name + "' publishes to " + b.to_string() + ", this instance's own listener '" +
                                l.name + "': a publishing loop (TMG error 12206)",
                            "point the target at the next tier or the Exchange host");

        if (r.kind == rule_kind::server && r.act == action::allow && r.to) {
            if (r.to->mode == server_mode::smtp) {
                for (auto& s : r.relay_from) {
                    if (covers_external(c, s, wide_external_bits)) {
                        add(out, severity::error, "SMTP001", r.relay_from_where, key + ".relay_from",
                            "open relay: rule '" + r.name + "' lets anonymous clients from " + describe_source(c, s) +
                                " relay to any domain",
                            "relay only for authenticated sessions, or list the few hosts that need it (an address set)");
                        continue;
                    }
                    auto ranges = c.ranges_of(s);
                    bool wide = c.find_network(s) != nullptr;
                    int widest = 0;
                    if (ranges)
                        for (auto& x : *ranges) widest = std::max(widest, x.host_bits());
                    if (widest > 3) wide = true;
                    if (wide)
                        add(out, severity::warning, "SMTP002", r.relay_from_where, key + ".relay_from",
                            "rule '" + r.name + "' lets every host of " + describe_source(c, s) +
                                " relay anonymously (up to 2^" + std::to_string(widest) + " addresses)",
                            "list only the application servers and devices that need to relay, as /32 entries");
                }
                if (r.accepted_domains.empty())
                    add(out, severity::warning, "SMTP006", r.where, key + ".accepted_domains",
                        "SMTP rule '" + r.name + "' has no accepted_domains: anonymous clients can send to no one",
                        "list the domains this organisation receives mail for");
            } else {
                bool from_external = r.from.empty() || std::any_of(r.from.begin(), r.from.end(), [&](auto& s) { return covers_external(c, s); });
                if (from_external)
                    add(out, severity::warning, "SMTP005", r.where, key + ".target.mode",
                        "SMTP rule '" + r.name + "' forwards bytes (tcp mode) from External: relay policy is left to the next hop, "
                        "which sees this tier as the client",
                        "use mode = \"smtp\" so this tier judges relaying with the real client address");
            }
        }

        if (!r.service.empty() && r.act == action::allow) {
            bool from_external = r.from.empty() || std::any_of(r.from.begin(), r.from.end(), [&](auto& s) { return covers_external(c, s); });
            if (r.service == "ecp" && from_external)
                add(out, severity::warning, "EXCH001", r.where, key,
                    "rule '" + r.name + "' publishes the Exchange admin center (/ecp) to External",
                    "keep /ecp internal; most Exchange attacks of 2021-2022 went through it");
            if (r.to && !r.to->tls && r.service != "smtp" && !r.to->host.empty())
                add(out, severity::warning, "EXCH002", r.to->where, key + ".target.tls",
                    "rule '" + r.name + "' reaches Exchange over plain HTTP",
                    "Extended Protection (Exchange 2019 CU14+) breaks NTLM/Kerberos behind TLS offload; set tls = true");
            if (r.service == "activesync" && r.to && r.to->timeouts.read < 3540s)
                add(out, severity::warning, "EXCH003", r.to->where, key + ".target.timeouts.read",
                    "ActiveSync read timeout is " + std::to_string(r.to->timeouts.read.count() / 1000) +
                        " s; a Ping may hold 3540 s and will be cut",
                    "use at least 3600 s");
        }
    }
}

}  // namespace dmz::rules
