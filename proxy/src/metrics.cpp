#include "metrics.hpp"

namespace dmz::proxy {

void metrics::counts::add(const counts& o) {
    for (auto& [k, v] : o.requests) requests[k] += v;
    bytes_in += o.bytes_in;
    bytes_out += o.bytes_out;
    for (std::size_t i = 0; i < latency.size(); ++i) latency[i] += o.latency[i];
    latency_sum += o.latency_sum;
    latency_count += o.latency_count;
    for (auto& [k, v] : o.active) active[k] += v;
    smtp_accepted += o.smtp_accepted;
    smtp_refused += o.smtp_refused;
    smtp_relay_denied += o.smtp_relay_denied;
    for (auto& [k, v] : o.auth_failures) auth_failures[k] += v;
    lockouts += o.lockouts;
    for (auto& [k, v] : o.rule_hits) rule_hits[k] += v;
    pool_idle += o.pool_idle;
    parked += o.parked;
    for (auto& [k, v] : o.faults) faults[k] += v;
}

void metrics::observe(const access_record& r, std::int64_t pool_idle) {
    if (!on) return;
    std::lock_guard lock(m_);
    if (pool_idle >= 0) c_.pool_idle = pool_idle;
    c_.bytes_in += r.bytes_in;
    c_.bytes_out += r.bytes_out;
    if (!r.rule.empty()) {
        auto it = c_.rule_hits.find(r.rule);
        if (it == c_.rule_hits.end()) c_.rule_hits.emplace(r.rule, 1);
        else ++it->second;
    }
    if (r.fault) ++c_.faults[{r.protocol, r.fault.cls, r.fault.side}];
    if (r.protocol == "smtp") {
        // One record per mail transaction: accepted when the next hop took the message.
        for (auto& [rcpt, reply] : r.rcpt_refused)
            if (reply.find("relay") != std::string::npos) ++c_.smtp_relay_denied;
        if (!r.queue_id.empty() || r.upstream_reply.rfind("250", 0) == 0) ++c_.smtp_accepted;
        else if (!r.mail_from.empty() || !r.rcpt_refused.empty()) ++c_.smtp_refused;
        return;
    }
    key_.assign(r.rule);
    key_ += '\0';
    key_ += r.action;
    key_ += '\0';
    key_ += r.status > 0 ? static_cast<char>('0' + r.status / 100 % 10) : '0';
    key_ += "xx";
    key_ += '\0';
    key_ += rules::to_string(r.fault.cls);
    auto it = c_.requests.find(key_);
    if (it == c_.requests.end()) c_.requests.emplace(key_, 1);
    else ++it->second;
    double s = r.duration_ms / 1000.0;
    std::size_t i = 0;
    while (i < buckets.size() && s > buckets[i]) ++i;
    ++c_.latency[i];
    c_.latency_sum += s;
    ++c_.latency_count;
}

void metrics::connection(const std::string& listener, int delta) {
    if (!on) return;
    std::lock_guard lock(m_);
    c_.active[listener] += delta;
}

void metrics::auth_failed(const std::string& reason) {
    if (!on) return;
    std::lock_guard lock(m_);
    // Reasons are a short fixed set; the one naming an address is folded (label cardinality).
    bool by_address = reason.rfind("too many failures", 0) == 0;
    ++c_.auth_failures[by_address ? std::string("too many failures from one address") : reason];
    if (reason == "locked out" || by_address) ++c_.lockouts;
}

}  // namespace dmz::proxy

namespace dmz::proxy {

void metrics::parked(int delta) {
    if (!on) return;
    std::lock_guard lock(m_);
    c_.parked += delta;
}
void metrics::escaped(const char* protocol) {
    if (!on) return;
    std::lock_guard lock(m_);
    ++c_.faults[{protocol, rules::fault_class::internal, rules::fault_side::tier}];
}

}  // namespace dmz::proxy
