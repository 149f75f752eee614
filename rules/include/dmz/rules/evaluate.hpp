#pragma once
/// @file First-match evaluation of one instance's rules over what is known of a transaction.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "dmz/rules/fault.hpp"
#include "dmz/rules/model.hpp"
#include "dmz/rules/path.hpp"

namespace dmz::rules {

/// Three-valued result of a condition: a fact not yet known (Host at the TLS stage) leaves
/// it undecided rather than guessed.
enum class tri { no, yes, unknown };

enum class identity { unknown, anonymous, authenticated };

/// What is known of a transaction at the moment of evaluation. Unset optionals are unknown.
struct facts {
    /// The listener the connection arrived on, by name: what evaluate(facts) resolves.
    /// evaluate(listener_id, facts) does not read it, except to name an unknown listener.
    std::string listener;
    std::optional<ip_address> client;  ///< the original client (after trusted forwarding)
    std::optional<std::string> sni;
    std::optional<std::string> host;    ///< Host header without port, any case
    std::optional<std::string> method;
    std::optional<std::string> target;  ///< origin-form request-target, raw
    identity who = identity::unknown;
    std::string user;
    std::vector<std::string> groups;
    // SMTP
    std::optional<std::string> mail_from;
    std::optional<std::string> rcpt;
};

enum class verdict { allow, deny, undecided };
const char* to_string(verdict v);

/// What a decision rests on, typed, so each protocol words it in its own terms (SMTP's
/// "550 5.7.1", HTTP's 403 page); `decision::reason` is the same in words.
enum class basis : std::uint8_t {
    allowed,              ///< an allow rule matched
    denied_by_rule,       ///< a deny rule matched
    exchange_template,    ///< an allow rule's Exchange template refused the request's shape
    relay_trick,          ///< a recipient with a source route, %-hack or similar
    relay_not_permitted,  ///< not an accepted domain, not authenticated, not in relay_from
    needs_authentication, ///< a rule would allow this for an authenticated user
    no_rule_matched,      ///< the built-in default deny
    not_known_yet,        ///< undecided: a condition's fact is not known at this stage
};
const char* to_string(basis b);

struct examined_rule {
    std::string rule;
    source_location where;
    enum class outcome { skipped_disabled, not_applicable, failed, undecided, matched } result;
    std::string condition;  ///< the first condition that failed or was undecided
    std::string reason;
};
const char* to_string(examined_rule::outcome o);

struct decision {
    verdict result = verdict::deny;
    fault_class why = fault_class::no_rule_matched;  ///< none when allowed or undecided
    basis because = basis::no_rule_matched;
    const rule* matched = nullptr;  ///< nullptr: the built-in default deny
    std::string rule_name;          ///< "default deny" when no rule matched
    source_location where;
    std::string reason;  ///< one line: why allowed or denied
    std::vector<examined_rule> trace;
    normalized_target path;  ///< set for web transactions with a target
    /// SMTP: "submit" or "relay" when allowed
    std::string smtp_disposition;
    /// The refusal as a fault (401 for auth-required, 403 otherwise); none when allowed.
    fault refusal() const;
    const target* to() const { return matched && result == verdict::allow && matched->to ? &*matched->to : nullptr; }
};

struct evaluate_options {
    bool enable_test_rules = false;  ///< evaluate as if each test rule were enabled
    /// Fill decision::trace, with the reason each rule before the match failed (explain and
    /// diagnose want it; the proxy's per-request path does not, and skips building it).
    bool trace = true;
};

namespace detail {
struct compiled_policy;
}

/// A listener of one compiled policy, resolved once (when the policy is built or a
/// connection arrives) so that evaluating a request looks nothing up by name. It is good
/// only with the policy that issued it: any other policy refuses it as an unknown listener.
class listener_id {
public:
    listener_id() = default;  ///< names no listener
    explicit operator bool() const { return policy_ != 0; }
    bool operator==(const listener_id&) const = default;

private:
    friend class policy;
    listener_id(std::uint64_t policy, std::uint32_t index) : policy_(policy), index_(index) {}
    std::uint64_t policy_ = 0;  ///< the issuing policy's serial number; 0: none
    std::uint32_t index_ = 0;   ///< the listener's position in the config
};

/// An instance's rules compiled once into immutable matchers: for each listener the rules
/// that can apply to it, sources as address ranges, path prefixes ready to compare. Built
/// once per config load and per reload, never changed after; copies share the compiled form.
class policy {
public:
    explicit policy(instance_config cfg);
    policy(const policy&) = default;
    policy& operator=(const policy&) = delete;  // immutable: a reload builds a new policy

    const instance_config& config() const;
    /// The listener named `name`; an empty id when there is none.
    listener_id resolve_listener(std::string_view name) const;
    /// First match for a transaction on the listener `where` (f.listener is not read).
    decision evaluate(listener_id where, const facts& f, const evaluate_options& opts = {}) const;
    /// The same, resolving f.listener by name first (explain, tests, offline tools).
    decision evaluate(const facts& f, const evaluate_options& opts = {}) const;
    /// Whether a source name (network, address set) covers the address.
    bool source_contains(std::string_view source_name, const ip_address& a) const;
    /// Whether `peer` is a previous tier whose forwarded client address is believed.
    bool trusts_forwarding_from(const ip_address& peer) const;

private:
    std::shared_ptr<const detail::compiled_policy> c_;
};

/// Compiles a loaded config into the policy that judges its transactions (once per load and
/// per reload; sessions keep the one they started with).
std::shared_ptr<const policy> compile(instance_config cfg);

/// Host name match with a leading "*." wildcard covering exactly one label.
bool host_matches(std::string_view pattern, std::string_view host);

/// RFC 5321 address checks relevant to relaying. Returns "" when the mailbox is a plain
/// local@domain, else why it must never relay (percent hack, bang path, source route,
/// quoted local part, double '@', over-long parts).
std::string relay_trick(std::string_view mailbox);
/// The domain of local@domain, lower case, without brackets or angle brackets.
std::string mailbox_domain(std::string_view mailbox);

}  // namespace dmz::rules
