#pragma once
/// @file Live: probe each hop of a running lab from the address that hop really uses, send
/// the request end to end, and say in one line whether the network or a rule stops it.
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
    std::string note;         ///< where the live lab and the topology file disagree
    explanation offline;
};

/// `ca_file`: the lab CA the hops are verified against. `map_ports`: the lab maps
/// privileged ports (lab.json says so).
diagnosis diagnose(const topology& t, const probe& p, const std::string& ca_file, bool map_ports);

}  // namespace dmz::topology
