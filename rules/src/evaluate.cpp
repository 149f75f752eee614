#include "dmz/rules/evaluate.hpp"

#include <algorithm>

#include "compiled.hpp"

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
    // Compared a character at a time: the host's case is folded without a copy.
    auto same = [](std::string_view h, std::string_view p) {
        if (h.size() != p.size()) return false;
        for (std::size_t i = 0; i < h.size(); ++i)
            if (detail::ascii_lower(h[i]) != p[i]) return false;
        return true;
    };
    if (pattern.starts_with("*.")) {
        auto suffix = pattern.substr(1);  // ".contoso.com"
        if (host.size() <= suffix.size() || !same(host.substr(host.size() - suffix.size()), suffix)) return false;
        auto label = host.substr(0, host.size() - suffix.size());
        return label.find('.') == std::string_view::npos;
    }
    return same(host, pattern);
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

namespace detail {

namespace {

using o_t = examined_rule::outcome;

/// One evaluation: walks the rules in order until one decides. The trace (and every string
/// in it) is built only when asked for; the per-request path visits only the listener's
/// candidate rules and copies nothing per rule.
class evaluation {
public:
    evaluation(const compiled_policy& c, const compiled_listener& l, const facts& f, const evaluate_options& opts,
               decision& d)
        : c_(c), l_(l), f_(f), opts_(opts), d_(d) {
        if (l_.web && f_.target) {
            d_.path = normalize_target(*f_.target);
            norm_ = &d_.path;
        }
    }

    /// Examines rule `i`; true when it decided the transaction.
    bool examine(std::uint32_t i);
    /// No rule decided: the built-in default deny, or a hint that a user would be allowed.
    void fall_through();

private:
    void note(const rule& r, o_t result);
    bool conditions(std::uint32_t i);
    tri sources(const compiled_rule& cr) const;
    tri hosts(const rule& r) const;
    tri paths(const compiled_rule& cr, bool& unsafe) const;
    tri users(const rule& r);
    void undecided(const rule& r);
    void matched(const compiled_rule& cr);
    void relay(const compiled_rule& cr);

    /// A condition's result: false when it failed (with the reason, built only for a
    /// trace); the first unknown one leaves the rule undecided.
    template <class Reason>
    bool condition(tri t, const char* name, Reason&& reason) {
        if (t == tri::no) {
            if (opts_.trace) {
                ex_.condition = name;
                ex_.reason = reason();
            }
            return false;
        }
        if (t == tri::unknown && !undecided_) {
            undecided_ = true;
            undecided_cond_ = name;
        }
        return true;
    }

    const compiled_policy& c_;
    const compiled_listener& l_;
    const facts& f_;
    const evaluate_options& opts_;
    decision& d_;
    const normalized_target* norm_ = nullptr;
    const rule* auth_candidate_ = nullptr;
    examined_rule ex_{};  ///< the rule being examined; filled only for a trace
    bool undecided_ = false;
    const char* undecided_cond_ = "";
};

void evaluation::note(const rule& r, o_t result) {
    if (!opts_.trace) return;
    ex_.rule = r.name;
    ex_.where = r.where;
    ex_.result = result;
    d_.trace.push_back(std::move(ex_));
}

bool evaluation::examine(std::uint32_t i) {
    const rule& r = *c_.rules[i].r;
    if (opts_.trace) ex_ = examined_rule{};
    undecided_ = false;
    undecided_cond_ = "";
    bool enabled = r.enabled || (r.test && opts_.enable_test_rules);
    if (!enabled) {
        if (opts_.trace) ex_.reason = r.test ? "disabled (test rule)" : "disabled";
        note(r, o_t::skipped_disabled);
        return false;
    }
    if ((r.kind == rule_kind::web && !l_.web) || (r.kind == rule_kind::server && l_.web)) {
        if (opts_.trace) ex_.reason = std::string(to_string(r.kind)) + " rule; this is " + (l_.web ? "HTTP" : "SMTP");
        note(r, o_t::not_applicable);
        return false;
    }
    if (!conditions(i)) {
        note(r, o_t::failed);
        return false;
    }
    if (undecided_) {
        undecided(r);
        return true;
    }
    note(r, o_t::matched);
    matched(c_.rules[i]);
    return true;
}

bool evaluation::conditions(std::uint32_t i) {
    const compiled_rule& cr = c_.rules[i];
    const rule& r = *cr.r;
    bool ok = condition(l_.listed[i] ? tri::yes : tri::no, "listener",
                        [&] { return "listener '" + l_.l->name + "' is not one of: " + join(r.listeners); });
    if (ok) {
        ok = condition(sources(cr), "from", [&] {
            return f_.client ? "client " + f_.client->to_string() + " (network " + c_.cfg.network_of(*f_.client) +
                                   ") is not in: " + join(r.from)
                             : std::string();
        });
    }
    if (ok && l_.web && !r.public_names.empty())
        ok = condition(hosts(r), "public_names",
                       [&] { return "host '" + f_.host.value_or("") + "' is not one of: " + join(r.public_names); });
    if (ok && l_.web && r.kind == rule_kind::web) {
        bool unsafe = false;
        tri t = paths(cr, unsafe);
        ok = condition(t, "paths", [&] {
            return unsafe ? "unsafe path: " + norm_->unsafe : "path '" + norm_->path + "' is not under: " + join(r.paths);
        });
    }
    if (ok && l_.web && !r.methods.empty()) {
        tri t = tri::unknown;
        if (f_.method) t = std::find(r.methods.begin(), r.methods.end(), *f_.method) != r.methods.end() ? tri::yes : tri::no;
        ok = condition(t, "methods", [&] { return "method " + f_.method.value_or("") + " is not one of: " + join(r.methods); });
    }
    if (ok && (!r.users.empty() || !r.groups.empty())) {
        ok = condition(users(r), "users", [&] {
            return f_.who == identity::anonymous
                       ? std::string("requires an authenticated user; the client is anonymous")
                       : "user '" + f_.user + "' is not among users [" + join(r.users) + "] or groups [" + join(r.groups) + "]";
        });
    }
    return ok;
}

tri evaluation::sources(const compiled_rule& cr) const {
    if (cr.r->from.empty()) return tri::yes;
    if (!f_.client) return tri::unknown;
    return c_.contains(cr.from, *f_.client) ? tri::yes : tri::no;
}

tri evaluation::hosts(const rule& r) const {
    if (!f_.host) return tri::unknown;
    for (auto& p : r.public_names)
        if (host_matches(p, *f_.host)) return tri::yes;
    return tri::no;
}

tri evaluation::paths(const compiled_rule& cr, bool& unsafe) const {
    if (!norm_) {
        // A deny decides without the path: an unsafe path would be refused anyway.
        // An allow must wait, since an unsafe path would stop it matching.
        return cr.paths.empty() && cr.r->act == action::deny ? tri::yes : tri::unknown;
    }
    if (!norm_->safe()) {
        unsafe = true;
        return tri::no;
    }
    if (cr.paths.empty()) return tri::yes;
    for (auto& p : cr.paths)
        if (p.covers(norm_->path)) return tri::yes;
    return tri::no;
}

tri evaluation::users(const rule& r) {
    if (f_.who == identity::anonymous) {
        if (!undecided_ && !auth_candidate_) auth_candidate_ = &r;
        return tri::no;
    }
    if (f_.who != identity::authenticated) return tri::unknown;
    for (auto& u : r.users)
        if (u == "*" || u == f_.user) return tri::yes;
    for (auto& g : r.groups)
        if (std::find(f_.groups.begin(), f_.groups.end(), g) != f_.groups.end()) return tri::yes;
    return tri::no;
}

void evaluation::undecided(const rule& r) {
    if (opts_.trace) {
        ex_.condition = undecided_cond_;
        ex_.reason = std::string(undecided_cond_) + " not known yet";
    }
    note(r, o_t::undecided);
    d_.result = verdict::undecided;
    d_.why = fault_class::none;
    d_.because = basis::not_known_yet;
    d_.matched = &r;
    d_.rule_name = r.name;
    d_.where = r.where;
    d_.reason = "rule '" + r.name + "' may match once " + undecided_cond_ + " is known";
}

void evaluation::matched(const compiled_rule& cr) {
    const rule& r = *cr.r;
    bool allow = r.act == action::allow;
    d_.matched = &r;
    d_.rule_name = r.name;
    d_.where = r.where;
    d_.result = allow ? verdict::allow : verdict::deny;
    d_.why = allow ? fault_class::none : fault_class::rule_denied;
    d_.because = allow ? basis::allowed : basis::denied_by_rule;
    d_.reason = allow ? "allowed by rule '" + r.name + "'" : "denied by rule '" + r.name + "'";

    if (allow && r.exchange_guards && norm_ && contains_nocase(norm_->decoded, "autodiscover") &&
        contains_nocase(norm_->decoded, "powershell")) {
        d_.result = verdict::deny;
        d_.why = fault_class::rule_denied;
        d_.because = basis::exchange_template;
        d_.reason = "refused by the Exchange template of rule '" + r.name +
                    "': the decoded URI names both autodiscover and powershell (ProxyShell/ProxyNotShell shape)";
    }
    if (allow && r.kind == rule_kind::server && f_.rcpt) relay(cr);
}

void evaluation::relay(const compiled_rule& cr) {
    const rule& r = *cr.r;
    auto trick = relay_trick(*f_.rcpt);
    auto domain = mailbox_domain(*f_.rcpt);
    bool accepted = trick.empty() && std::any_of(r.accepted_domains.begin(), r.accepted_domains.end(),
                                                 [&](auto& a) { return host_matches(a, domain); });
    bool relay_source = f_.client && c_.contains(cr.relay_from, *f_.client);
    if (!trick.empty()) {
        d_.result = verdict::deny;
        d_.why = fault_class::rule_denied;
        d_.because = basis::relay_trick;
        d_.reason = "recipient " + std::string(*f_.rcpt) + " uses " + trick + ", which is never relayed (rule '" + r.name + "')";
    } else if (accepted) {
        d_.smtp_disposition = "submit";
        d_.reason = "submit to accepted domain " + domain + " (rule '" + r.name + "')";
    } else if (r.relay_authenticated && f_.who == identity::authenticated) {
        d_.smtp_disposition = "relay";
        d_.reason = "relay to " + domain + " for authenticated user '" + f_.user + "' (rule '" + r.name + "')";
    } else if (relay_source) {
        d_.smtp_disposition = "relay";
        d_.reason = "relay to " + domain + " for client " + f_.client->to_string() + " in relay_from (rule '" + r.name + "')";
    } else if (f_.who == identity::unknown && r.relay_authenticated) {
        d_.result = verdict::undecided;
        d_.because = basis::not_known_yet;
        d_.reason = "relay to " + domain + " depends on authentication, not known yet";
    } else {
        d_.result = verdict::deny;
        d_.why = fault_class::rule_denied;
        d_.because = basis::relay_not_permitted;
        d_.reason = "relay to " + domain + " denied: not an accepted domain of rule '" + r.name + "' (" +
                    join(r.accepted_domains) + "), the session is not authenticated, and client " +
                    (f_.client ? f_.client->to_string() : std::string("?")) + " is not in relay_from [" +
                    join(r.relay_from) + "]";
    }
}

void evaluation::fall_through() {
    d_.rule_name = "default deny";
    d_.result = verdict::deny;
    if (auth_candidate_) {
        d_.why = fault_class::auth_required;
        d_.because = basis::needs_authentication;
        d_.matched = nullptr;
        d_.rule_name = auth_candidate_->name;
        d_.where = auth_candidate_->where;
        d_.reason = "rule '" + auth_candidate_->name + "' would allow this for an authenticated user";
        return;
    }
    d_.why = fault_class::no_rule_matched;
    d_.because = basis::no_rule_matched;
    d_.reason = "no rule matched; the built-in default rule denies";
}

}  // namespace

decision evaluate(const compiled_policy& c, const compiled_listener& l, const facts& f, const evaluate_options& opts) {
    decision d;
    evaluation e(c, l, f, opts, d);
    if (opts.trace) {
        // Every rule, each with its outcome, for explain and diagnose.
        for (std::uint32_t i = 0; i < c.rules.size(); ++i)
            if (e.examine(i)) return d;
    } else {
        // Only the rules that can apply to this listener: the others fail on its kind or its
        // name, which leaves nothing behind when no trace is kept.
        for (auto i : l.candidates)
            if (e.examine(i)) return d;
    }
    e.fall_through();
    return d;
}

}  // namespace detail

}  // namespace dmz::rules
