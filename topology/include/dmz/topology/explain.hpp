#pragma once
/// @file Offline: the decision at each tier for one request or mail, from a client address.
#include <optional>
#include <string>
#include <vector>

#include "dmz/topology/topology.hpp"

namespace dmz::topology {

struct probe {
    ip_address from;
    bool smtp = false;
    std::string url;         ///< http(s)://name[:port]/path?query (web)
    std::string smtp_server; ///< name[:port] (SMTP); the topology's mx when empty
    std::string method = "GET";
    std::string user;        ///< empty: anonymous
    std::string password;    ///< diagnose: sent as Basic credentials with `user`
    /// The user's groups from the user store; unset: from the instance config's [users].
    std::optional<std::vector<std::string>> groups;
    std::string mail_from;
    std::string rcpt;
    bool with_test_rules = false;
};

struct tier_result {
    std::string instance;
    std::string role;
    std::string address;  ///< address:port the tier was reached on
    std::string listener;
    std::string transport_source;  ///< the peer address this tier sees
    std::string client;            ///< the client address its rules judge
    std::string client_note;       ///< how it learnt it
    std::string host;              ///< Host (web)
    std::string sni;
    std::string path;              ///< normalized
    rules::decision decision;      ///< trace and verdict (copied rule data)
    std::string matched_rule;
    std::string action;            ///< allow / deny
    std::string target;            ///< where it forwards to, when allowed
};

/// One network hop of the path: who connects from where to what.
struct hop_info {
    std::string from;  ///< "client" or an instance
    std::string to;    ///< an instance or host
    ip_address source;
    ip_address address;
    std::uint16_t port = 0;
    rules::protocol proto = rules::protocol::https;
    std::string sni;  ///< https: the name asked for and verified
    std::string host;  ///< http(s): the Host sent
};

enum class outcome { ok, rule_fault, network_fault, auth_fault };
const char* to_string(outcome o);

struct explanation {
    outcome result = outcome::network_fault;
    std::string reached;  ///< host name, or "" when nothing reached
    std::string stopped_at;  ///< tier or hop that stopped it
    std::string reason;
    std::string redirect;  ///< set when an http listener redirected to https first
    /// What the host reached receives: the connection's source, the forwarded client, Host.
    std::string arrival;
    std::vector<tier_result> tiers;
    std::vector<hop_info> hops;  ///< the hops walked, the failing one last
    /// With the test rules enabled (computed when the verdict is a rule fault).
    std::optional<outcome> with_test_rules;
    std::string with_test_rules_reached;
    std::string with_test_rules_reason;
    bool allowed() const { return result == outcome::ok; }
};

/// Throws std::invalid_argument for a probe that cannot be understood (bad URL).
/// `map_privileged_ports`: the URL's port is mapped as a lab without privilege runs it.
explanation explain(const topology& t, const probe& p, bool map_privileged_ports = false);

}  // namespace dmz::topology
