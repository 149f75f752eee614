#include "dmz/rules/fault.hpp"

namespace dmz::rules {

const char* to_string(fault_class c) {
    switch (c) {
    case fault_class::none: return "";
    case fault_class::rule_denied: return "rule-denied";
    case fault_class::no_rule_matched: return "no-rule-matched";
    case fault_class::auth_required: return "auth-required";
    case fault_class::auth_failed: return "auth-failed";
    case fault_class::bad_request: return "bad-request";
    case fault_class::upstream_connect: return "upstream-connect";
    case fault_class::upstream_tls: return "upstream-tls";
    case fault_class::upstream_timeout: return "upstream-timeout";
    case fault_class::upstream_protocol: return "upstream-protocol";
    case fault_class::upstream_unavailable: return "upstream-unavailable";
    case fault_class::directory_unavailable: return "directory-unavailable";
    case fault_class::rate_limited: return "rate-limited";
    case fault_class::overloaded: return "overloaded";
    case fault_class::internal: return "internal";
    }
    return "?";
}

const char* to_string(fault_side s) {
    switch (s) {
    case fault_side::client: return "client";
    case fault_side::tier: return "tier";
    case fault_side::upstream: return "upstream";
    }
    return "?";
}

fault_side side_of(fault_class c) {
    switch (c) {
    case fault_class::auth_required:
    case fault_class::auth_failed:
    case fault_class::bad_request:
    case fault_class::rate_limited:
        return fault_side::client;
    case fault_class::upstream_connect:
    case fault_class::upstream_tls:
    case fault_class::upstream_timeout:
    case fault_class::upstream_protocol:
    case fault_class::upstream_unavailable:
    case fault_class::directory_unavailable:
        return fault_side::upstream;
    default:
        return fault_side::tier;  // this tier's rules, capacity, or a bug
    }
}

bool retryable(fault_class c) {
    switch (c) {
    case fault_class::upstream_connect:
    case fault_class::upstream_timeout:
    case fault_class::upstream_unavailable:
    case fault_class::directory_unavailable:
    case fault_class::rate_limited:
    case fault_class::overloaded:
        return true;
    default:
        return false;  // the same request meets the same rule, the same framing, the same peer
    }
}

fault make_fault(fault_class c, int status, std::string detail, std::string rule) {
    return fault{c, side_of(c), retryable(c), status, std::move(detail), std::move(rule)};
}

}  // namespace dmz::rules
