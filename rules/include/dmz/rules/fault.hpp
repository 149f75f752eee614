#pragma once
// One fault type from rule evaluation to the access log and metrics: what went wrong (the
// class users read to tell a network fault from a rule fault), which side caused it, whether
// a retry may succeed, the status this tier answered with, and the detail.
#include <cstdint>
#include <string>

namespace dmz::rules {

/// DESIGN.md's fault classes.
enum class fault_class : std::uint8_t {
    none,
    rule_denied,
    no_rule_matched,
    auth_required,
    auth_failed,
    bad_request,
    upstream_connect,
    upstream_tls,
    upstream_timeout,
    upstream_protocol,
    upstream_unavailable,   ///< no healthy member of a farm
    directory_unavailable,  ///< the directory, not the password, failed
    rate_limited,
    overloaded,  ///< this tier's bounded work (password checks) is saturated
    internal,    ///< a bug: an exception reached a session's root
};

/// Who caused a fault: the client (downstream), this tier, or the next hop (upstream).
enum class fault_side : std::uint8_t { client, tier, upstream };

/// The name logs, metrics, X-Dmz-Error and `explain` print ("rule-denied"); "" for none.
const char* to_string(fault_class c);
const char* to_string(fault_side s);
/// The side a class arises on, and whether the same request may succeed when tried again.
fault_side side_of(fault_class c);
bool retryable(fault_class c);

struct fault {
    fault_class cls = fault_class::none;
    fault_side side = fault_side::tier;
    bool retryable = false;
    /// The HTTP status (or SMTP reply code) this tier answered with; 0 when it sent none.
    int status = 0;
    std::string detail;
    std::string rule;  ///< the rule that decided, when one did

    explicit operator bool() const { return cls != fault_class::none; }
};

/// A fault of class `c` with the side and retryability that class has.
fault make_fault(fault_class c, int status, std::string detail, std::string rule = {});

}  // namespace dmz::rules
