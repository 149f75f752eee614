#include "dmz/rules/evaluate.hpp"

#include <algorithm>

namespace dmz::rules {

const char* to_string(verdict v) {
    switch (v) {
    case verdict::allow: return "allow";
    case verdict::deny: return "deny";
    case verdict::undecided: return "undecided";
    }
    return "?";
}

const char* to_string(basis b) {
    switch (b) {
    case basis::allowed: return "allowed";
    case basis::denied_by_rule: return "denied-by-rule";
    case basis::exchange_template: return "exchange-template";
    case basis::relay_trick: return "relay-trick";
    case basis::relay_not_permitted: return "relay-not-permitted";
    case basis::needs_authentication: return "needs-authentication";
    case basis::no_rule_matched: return "no-rule-matched";
    case basis::not_known_yet: return "not-known-yet";
    }
    return "?";
}

fault decision::refusal() const {
    if (why == fault_class::none) return {};
    return make_fault(why, why == fault_class::auth_required ? 401 : 403, reason, matched ? rule_name : std::string());
}

const char* to_string(examined_rule::outcome o) {
    using o_t = examined_rule::outcome;
    switch (o) {
    case o_t::skipped_disabled: return "skipped";
    case o_t::not_applicable: return "not-applicable";
    case o_t::failed: return "no-match";
    case o_t::undecided: return "undecided";
    case o_t::matched: return "match";
    }
    return "?";
}

bool host_matches(std::string_view pattern, std::string_view host) {
    auto h = to_lower(host);
    if (pattern.starts_with("*.")) {
        auto suffix = pattern.substr(1);  // ".contoso.com"
        if (h.size() <= suffix.size() || !std::string_view(h).ends_with(suffix)) return false;
        auto label = std::string_view(h).substr(0, h.size() - suffix.size());
        return label.find('.') == std::string_view::npos;
    }
    return h == pattern;
}

namespace {
std::string_view strip_angles(std::string_view m) {
    while (!m.empty() && m.front() == ' ') m.remove_prefix(1);
    while (!m.empty() && m.back() == ' ') m.remove_suffix(1);
    if (m.size() >= 2 && m.front() == '<' && m.back() == '>') m = m.substr(1, m.size() - 2);
    return m;
}

std::string join(const std::vector<std::string>& v) {
    std::string out;
    for (std::size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + v[i];
    return out;
}
}  // namespace

std::string mailbox_domain(std::string_view mailbox) {
    auto m = strip_angles(mailbox);
    auto at = m.rfind('@');
    if (at == std::string_view::npos) return "";
    auto d = m.substr(at + 1);
    if (d.size() >= 2 && d.front() == '[' && d.back() == ']') return std::string(d);
    return to_lower(d);
}

std::string relay_trick(std::string_view mailbox) {
    auto m = strip_angles(mailbox);
    if (m.empty()) return "an empty recipient";
    if (m.front() == '@') return "a source route (@host:user@domain)";
    if (m.find('"') != std::string_view::npos) return "a quoted local part";
    auto at = m.rfind('@');
    if (at == std::string_view::npos) return "no domain";
    if (m.find('@') != at) return "more than one '@'";
    auto local = m.substr(0, at);
    auto domain = m.substr(at + 1);
    if (local.find('%') != std::string_view::npos) return "a percent hack (user%other@domain)";
    if (local.find('!') != std::string_view::npos) return "a bang path (host!user)";
    if (local.find(':') != std::string_view::npos || local.find(',') != std::string_view::npos)
        return "a source route";
    if (local.empty()) return "an empty local part";
    if (local.size() > 64) return "a local part longer than 64 octets";
    if (domain.empty()) return "no domain";
    if (domain.size() > 255) return "a domain longer than 255 octets";
    return "";
}

policy::policy(instance_config cfg) : cfg_(std::move(cfg)) {}

bool policy::source_contains(const std::string& name, const ip_address& a) const {
    if (name == external_network) return cfg_.network_of(a) == external_network;
    auto ranges = cfg_.ranges_of(name);
    if (!ranges) return false;
    return std::any_of(ranges->begin(), ranges->end(), [&](const cidr& c) { return c.contains(a); });
}

bool policy::trusts_forwarding_from(const ip_address& peer) const {
    return std::any_of(cfg_.trust_forwarded_from.begin(), cfg_.trust_forwarded_from.end(),
                       [&](const std::string& s) { return source_contains(s, peer); });
}

tri policy::match_sources(const std::vector<std::string>& names,
                          const std::optional<ip_address>& a) const {
    if (names.empty()) return tri::yes;
    if (!a) return tri::unknown;
    for (auto& n : names)
        if (source_contains(n, *a)) return tri::yes;
    return tri::no;
}

decision policy::evaluate(const facts& f, const evaluate_options& opts) const {
    decision d;
    const listener* lst = cfg_.find_listener(f.listener);
    if (!lst) {
        d.rule_name = "default deny";
        d.reason = "no listener named '" + f.listener + "'";
        return d;
    }
    bool web = lst->proto != protocol::smtp;
    const normalized_target* norm = nullptr;
    if (web && f.target) {
        d.path = normalize_target(*f.target);
        norm = &d.path;
    }
    const rule* auth_candidate = nullptr;
    using o_t = examined_rule::outcome;

    for (auto& r : cfg_.rules) {
        // Filled only for a trace: the per-request path copies nothing per rule.
        examined_rule ex{};
        auto note = [&](o_t result) {
            if (!opts.trace) return;
            ex.rule = r.name;
            ex.where = r.where;
            ex.result = result;
            d.trace.push_back(std::move(ex));
        };
        bool enabled = r.enabled || (r.test && opts.enable_test_rules);
        if (!enabled) {
            if (opts.trace) ex.reason = r.test ? "disabled (test rule)" : "disabled";
            note(o_t::skipped_disabled);
            continue;
        }
        if ((r.kind == rule_kind::web && !web) || (r.kind == rule_kind::server && web)) {
            if (opts.trace) ex.reason = std::string(to_string(r.kind)) + " rule; this is " + (web ? "HTTP" : "SMTP");
            note(o_t::not_applicable);
            continue;
        }

        bool undecided = false;
        const char* undecided_cond = "";
        // The reason is built only when the condition fails and a trace is wanted.
        auto cond = [&](tri t, const char* name, auto&& reason) -> bool {
            if (t == tri::no) {
                if (opts.trace) {
                    ex.condition = name;
                    ex.reason = reason();
                }
                return false;
            }
            if (t == tri::unknown && !undecided) {
                undecided = true;
                undecided_cond = name;
            }
            return true;
        };

        bool ok = cond(r.listeners.empty() || std::find(r.listeners.begin(), r.listeners.end(), f.listener) != r.listeners.end()
                           ? tri::yes : tri::no,
                       "listener", [&] { return "listener '" + f.listener + "' is not one of: " + join(r.listeners); });
        if (ok) {
            tri t = match_sources(r.from, f.client);
            ok = cond(t, "from", [&] {
                return f.client ? "client " + f.client->to_string() + " (network " + cfg_.network_of(*f.client) +
                                      ") is not in: " + join(r.from)
                                : std::string();
            });
        }
        if (ok && web && !r.public_names.empty()) {
            tri t = tri::unknown;
            if (f.host) {
                t = tri::no;
                for (auto& p : r.public_names)
                    if (host_matches(p, *f.host)) t = tri::yes;
            }
            ok = cond(t, "public_names", [&] { return "host '" + f.host.value_or("") + "' is not one of: " + join(r.public_names); });
        }
        if (ok && web && r.kind == rule_kind::web) {
            tri t = tri::unknown;
            bool unsafe = false;
            if (norm) {
                if (!norm->safe()) {
                    t = tri::no;
                    unsafe = true;
                } else if (r.paths.empty()) {
                    t = tri::yes;
                } else {
                    t = tri::no;
                    for (auto& p : r.paths)
                        if (path_has_prefix(norm->path, p)) t = tri::yes;
                }
            } else if (r.paths.empty() && r.act == action::deny) {
                // A deny decides without the path: an unsafe path would be refused anyway.
                // An allow must wait, since an unsafe path would stop it matching.
                t = tri::yes;
            }
            ok = cond(t, "paths", [&] {
                return unsafe ? "unsafe path: " + norm->unsafe : "path '" + norm->path + "' is not under: " + join(r.paths);
            });
        }
        if (ok && web && !r.methods.empty()) {
            tri t = tri::unknown;
            if (f.method) t = std::find(r.methods.begin(), r.methods.end(), *f.method) != r.methods.end() ? tri::yes : tri::no;
            ok = cond(t, "methods", [&] { return "method " + f.method.value_or("") + " is not one of: " + join(r.methods); });
        }
        if (ok && (!r.users.empty() || !r.groups.empty())) {
            tri t = tri::unknown;
            if (f.who == identity::anonymous) {
                t = tri::no;
                if (!undecided && !auth_candidate) auth_candidate = &r;
            } else if (f.who == identity::authenticated) {
                t = tri::no;
                for (auto& u : r.users)
                    if (u == "*" || u == f.user) t = tri::yes;
                for (auto& g : r.groups)
                    if (std::find(f.groups.begin(), f.groups.end(), g) != f.groups.end()) t = tri::yes;
            }
            ok = cond(t, "users", [&] {
                return f.who == identity::anonymous
                           ? std::string("requires an authenticated user; the client is anonymous")
                           : "user '" + f.user + "' is not among users [" + join(r.users) + "] or groups [" + join(r.groups) + "]";
            });
        }
        if (!ok) {
            note(o_t::failed);
            continue;
        }
        if (undecided) {
            if (opts.trace) {
                ex.condition = undecided_cond;
                ex.reason = std::string(undecided_cond) + " not known yet";
            }
            note(o_t::undecided);
            d.result = verdict::undecided;
            d.why = fault_class::none;
            d.because = basis::not_known_yet;
            d.matched = &r;
            d.rule_name = r.name;
            d.where = r.where;
            d.reason = "rule '" + r.name + "' may match once " + undecided_cond + " is known";
            return d;
        }

        note(o_t::matched);
        d.matched = &r;
        d.rule_name = r.name;
        d.where = r.where;
        d.result = r.act == action::allow ? verdict::allow : verdict::deny;
        d.why = r.act == action::allow ? fault_class::none : fault_class::rule_denied;
        d.because = r.act == action::allow ? basis::allowed : basis::denied_by_rule;
        d.reason = r.act == action::allow ? "allowed by rule '" + r.name + "'" : "denied by rule '" + r.name + "'";

        if (r.act == action::allow && r.exchange_guards && norm &&
            contains_nocase(norm->decoded, "autodiscover") && contains_nocase(norm->decoded, "powershell")) {
            d.result = verdict::deny;
            d.why = fault_class::rule_denied;
            d.because = basis::exchange_template;
            d.reason = "refused by the Exchange template of rule '" + r.name +
                       "': the decoded URI names both autodiscover and powershell (ProxyShell/ProxyNotShell shape)";
        }
        if (r.act == action::allow && r.kind == rule_kind::server && f.rcpt) {
            auto trick = relay_trick(*f.rcpt);
            auto domain = mailbox_domain(*f.rcpt);
            bool accepted = trick.empty() && std::any_of(r.accepted_domains.begin(), r.accepted_domains.end(),
                                                         [&](auto& a) { return host_matches(a, domain); });
            bool relay_source = f.client && std::any_of(r.relay_from.begin(), r.relay_from.end(),
                                                        [&](auto& s) { return source_contains(s, *f.client); });
            if (!trick.empty()) {
                d.result = verdict::deny;
                d.why = fault_class::rule_denied;
                d.because = basis::relay_trick;
                d.reason = "recipient " + std::string(*f.rcpt) + " uses " + trick +
                           ", which is never relayed (rule '" + r.name + "')";
            } else if (accepted) {
                d.smtp_disposition = "submit";
                d.reason = "submit to accepted domain " + domain + " (rule '" + r.name + "')";
            } else if (r.relay_authenticated && f.who == identity::authenticated) {
                d.smtp_disposition = "relay";
                d.reason = "relay to " + domain + " for authenticated user '" + f.user + "' (rule '" + r.name + "')";
            } else if (relay_source) {
                d.smtp_disposition = "relay";
                d.reason = "relay to " + domain + " for client " + f.client->to_string() + " in relay_from (rule '" + r.name + "')";
            } else if (f.who == identity::unknown && r.relay_authenticated) {
                d.result = verdict::undecided;
                d.because = basis::not_known_yet;
                d.reason = "relay to " + domain + " depends on authentication, not known yet";
            } else {
                d.result = verdict::deny;
                d.why = fault_class::rule_denied;
                d.because = basis::relay_not_permitted;
                d.reason = "relay to " + domain + " denied: not an accepted domain of rule '" + r.name +
                           "' (" + join(r.accepted_domains) + "), the session is not authenticated, and client " +
                           (f.client ? f.client->to_string() : std::string("?")) + " is not in relay_from [" +
                           join(r.relay_from) + "]";
            }
        }
        return d;
    }

    d.rule_name = "default deny";
    d.result = verdict::deny;
    if (auth_candidate) {
        d.why = fault_class::auth_required;
        d.because = basis::needs_authentication;
        d.matched = nullptr;
        d.rule_name = auth_candidate->name;
        d.where = auth_candidate->where;
        d.reason = "rule '" + auth_candidate->name + "' would allow this for an authenticated user";
        return d;
    }
    d.why = fault_class::no_rule_matched;
    d.because = basis::no_rule_matched;
    d.reason = "no rule matched; the built-in default rule denies";
    return d;
}

}  // namespace dmz::rules
