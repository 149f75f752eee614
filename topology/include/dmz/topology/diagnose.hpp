#pragma once
/// @file Live: probe each hop of a running deployment (a lab is one) from the address that
/// hop really uses, send the request end to end, and say in one line whether the network
/// or a rule stops it. Each tier probes its own next hop through its admin endpoint
/// (POST /probe); the client's hop is probed from here.
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "dmz/topology/explain.hpp"

namespace dmz::topology {

struct hop_probe {
    hop_info hop;
    std::string tcp;         ///< "ok", or why not (refused 10061, timed out 10060, ...)
    std::string tls;         ///< "" (not TLS), "ok", or the failure
    std::string tls_detail;  ///< the names on the certificate presented
    std::string rule;        ///< the rule that decides at the receiving tier (offline)
    std::string action;
    std::string by;          ///< the instance that probed this hop ("" when probed from here)
    bool probed = true;      ///< false: nobody could probe it (tcp says why); no verdict from it
};

/// What an instance answered when asked to probe its own next hop for a rule.
struct remote_probe {
    std::string error;     ///< why it could not be asked, or refused ("" when it probed)
    std::string tcp, tls;  ///< as in hop_probe
    std::string names;     ///< the certificate's names
    std::string source, address;  ///< what the running instance really used
    int port = 0;
};

struct diagnose_settings {
    std::string ca_file;  ///< trust for the hops probed from here ("": the system's)
    bool map_ports = false;  ///< the lab maps privileged ports (lab.json says so)
    /// Bind the client's connections to the probe's `from` (a lab, or --from given).
    bool bind_client = true;
    /// Asks `instance` to probe its next hop for `rule`; nullopt when it has no admin
    /// endpoint known here (the hop is then probed from here, from its source address).
    std::function<std::optional<remote_probe>(const std::string& instance, const std::string& rule)> ask;
};

struct diagnosis {
    std::string verdict;  ///< ok, network-fault, rule-fault, auth-fault
    std::string tier;     ///< the instance (or host) where it stops
    std::string hop;      ///< "back-end -> exchange"
    std::string reason;
    std::vector<hop_probe> hops;
    int status = 0;           ///< the end-to-end HTTP status, or the SMTP reply code
    std::string response;     ///< X-Dmz-Error, or the SMTP reply text
    std::string test_rules;   ///< what the tiers' test rules would change, for this probe
    std::string note;         ///< where the running instances and the topology file disagree
    explanation offline;
};

diagnosis diagnose(const topology& t, const probe& p, const diagnose_settings& s);

}  // namespace dmz::topology
