// A config compiled into the policy that judges its transactions: listeners resolved to
// positions, each listener's candidate rules listed in order, source names turned into
// address ranges, path prefixes trimmed and lower-cased. Done once per load and reload.
#include <algorithm>
#include <atomic>

#include "compiled.hpp"

namespace dmz::rules {

namespace detail {

namespace {

std::uint64_t next_serial() {
    static std::atomic<std::uint64_t> last{0};
    return last.fetch_add(1, std::memory_order_relaxed) + 1;
}

path_prefix compile_prefix(std::string_view p) {
    while (p.size() > 1 && p.back() == '/') p.remove_suffix(1);
    path_prefix out;
    if (p == "/" || p.empty()) return out;
    out.lower.reserve(p.size());
    for (char ch : p) out.lower.push_back(ascii_lower(ch));
    return out;
}

bool applies_to(const rule& r, bool web) {
    return !((r.kind == rule_kind::web && !web) || (r.kind == rule_kind::server && web));
}

compiled_listener compile_listener(const listener& l, const std::vector<rule>& rules) {
    compiled_listener out;
    out.l = &l;
    out.web = l.proto != protocol::smtp;
    out.listed.reserve(rules.size());
    for (std::uint32_t i = 0; i < rules.size(); ++i) {
        auto& names = rules[i].listeners;
        bool listed = names.empty() || std::find(names.begin(), names.end(), l.name) != names.end();
        out.listed.push_back(listed);
        if (listed && applies_to(rules[i], out.web)) out.candidates.push_back(i);
    }
    return out;
}

}  // namespace

bool path_prefix::covers(std::string_view path) const {
    if (lower.empty()) return true;
    if (path.size() < lower.size()) return false;
    for (std::size_t i = 0; i < lower.size(); ++i)
        if (ascii_lower(path[i]) != lower[i]) return false;
    return path.size() == lower.size() || path[lower.size()] == '/';
}

compiled_policy::compiled_policy(instance_config c) : serial(next_serial()), cfg(std::move(c)) {
    for (auto& n : cfg.networks)
        for (auto& r : n.ranges) claimed.emplace_back(r, n.name == external_network);
    trusted = sources(cfg.trust_forwarded_from);
    rules.reserve(cfg.rules.size());
    for (auto& r : cfg.rules) {
        compiled_rule cr;
        cr.r = &r;
        cr.from = sources(r.from);
        cr.relay_from = sources(r.relay_from);
        for (auto& p : r.paths) cr.paths.push_back(compile_prefix(p));
        rules.push_back(std::move(cr));
    }
    listeners.reserve(cfg.listeners.size());
    for (auto& l : cfg.listeners) listeners.push_back(compile_listener(l, cfg.rules));
}

// As instance_config::ranges_of() reads a name: External, else a network, else an address set.
source_set compiled_policy::sources(const std::vector<std::string>& names) const {
    source_set out;
    for (auto& n : names) {
        if (n == external_network) {
            out.external = true;
        } else if (auto* net = cfg.find_network(n)) {
            out.ranges.insert(out.ranges.end(), net->ranges.begin(), net->ranges.end());
        } else if (auto* set = cfg.find_address_set(n)) {
            out.ranges.insert(out.ranges.end(), set->ranges.begin(), set->ranges.end());
        }
    }
    return out;
}

bool compiled_policy::external(const ip_address& a) const {
    for (auto& [range, is_external] : claimed)
        if (range.contains(a)) return is_external;
    return true;
}

bool compiled_policy::contains(const source_set& s, const ip_address& a) const {
    if (s.external && external(a)) return true;
    return std::any_of(s.ranges.begin(), s.ranges.end(), [&](const cidr& r) { return r.contains(a); });
}

}  // namespace detail

policy::policy(instance_config cfg) : c_(std::make_shared<const detail::compiled_policy>(std::move(cfg))) {}

std::shared_ptr<const policy> compile(instance_config cfg) { return std::make_shared<const policy>(std::move(cfg)); }

const instance_config& policy::config() const { return c_->cfg; }

listener_id policy::resolve_listener(std::string_view name) const {
    for (std::uint32_t i = 0; i < c_->listeners.size(); ++i)
        if (c_->listeners[i].l->name == name) return listener_id(c_->serial, i);
    return {};
}

decision policy::evaluate(listener_id where, const facts& f, const evaluate_options& opts) const {
    if (where.policy_ != c_->serial || where.index_ >= c_->listeners.size()) {
        decision d;
        d.rule_name = "default deny";
        d.reason = "no listener named '" + f.listener + "'";
        return d;
    }
    return detail::evaluate(*c_, c_->listeners[where.index_], f, opts);
}

decision policy::evaluate(const facts& f, const evaluate_options& opts) const {
    return evaluate(resolve_listener(f.listener), f, opts);
}

bool policy::source_contains(std::string_view name, const ip_address& a) const {
    if (name == external_network) return c_->external(a);
    const std::vector<cidr>* ranges = nullptr;
    if (auto* n = c_->cfg.find_network(name)) ranges = &n->ranges;
    else if (auto* s = c_->cfg.find_address_set(name)) ranges = &s->ranges;
    return ranges && std::any_of(ranges->begin(), ranges->end(), [&](const cidr& c) { return c.contains(a); });
}

bool policy::trusts_forwarding_from(const ip_address& peer) const { return c_->contains(c_->trusted, peer); }

}  // namespace dmz::rules
