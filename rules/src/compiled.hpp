#pragma once
// The compiled form of a policy (evaluate.hpp): built once by compile.cpp, read-only after,
// so evaluating a transaction looks nothing up by name and re-parses nothing of the config.
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dmz/rules/evaluate.hpp"

namespace dmz::rules::detail {

inline char ascii_lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

/// Source names (networks, address sets, External) as the ranges they stand for.
struct source_set {
    bool external = false;  ///< names External: every address no network claims
    std::vector<cidr> ranges;
};

/// A path prefix as path_has_prefix() compares it: trailing '/' trimmed, lower case.
struct path_prefix {
    std::string lower;  ///< empty: the prefix is "/", every path lies under it
    bool covers(std::string_view path) const;
};

struct compiled_rule {
    const rule* r = nullptr;
    source_set from;  ///< used when r->from is not empty
    source_set relay_from;
    std::vector<path_prefix> paths;
};

struct compiled_listener {
    const listener* l = nullptr;
    bool web = false;  ///< http or https; smtp otherwise
    /// Per rule, in order: the rule names this listener, or names no listener.
    std::vector<bool> listed;
    /// The rules of this listener's kind that name it, in order: all the per-request path
    /// visits (disabled ones included, since evaluate_options may enable test rules).
    std::vector<std::uint32_t> candidates;
};

struct compiled_policy {
    explicit compiled_policy(instance_config c);
    compiled_policy(const compiled_policy&) = delete;  // the members point into cfg
    compiled_policy& operator=(const compiled_policy&) = delete;

    std::uint64_t serial;  ///< unique in the process: listener ids name their policy by it
    instance_config cfg;
    /// Every network's ranges in order, each with whether its network is named External
    /// (as network_of() answers, so External is what the first claim or no claim says).
    std::vector<std::pair<cidr, bool>> claimed;
    std::vector<compiled_rule> rules;
    std::vector<compiled_listener> listeners;  ///< in config order
    source_set trusted;                        ///< trust_forwarded_from

    source_set sources(const std::vector<std::string>& names) const;
    bool external(const ip_address& a) const;
    bool contains(const source_set& s, const ip_address& a) const;
};

/// One evaluation of `f` on listener `l` (evaluate.cpp).
decision evaluate(const compiled_policy& c, const compiled_listener& l, const facts& f, const evaluate_options& opts);

}  // namespace dmz::rules::detail
