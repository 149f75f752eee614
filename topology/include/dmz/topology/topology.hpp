#pragma once
/// @file A lab topology: networks, instances with their legs, simulated hosts, public names;
/// and each instance's config derived from it.
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dmz/rules/config.hpp"
#include "dmz/rules/evaluate.hpp"

namespace dmz::topology {

using rules::diagnostics;
using rules::ip_address;
using rules::source_location;

struct network {
    std::string name;
    std::vector<rules::cidr> ranges;
    std::optional<ip_address> client_address;  ///< an address a lab client binds to be here
    source_location where;
};

struct leg {
    std::string network;
    ip_address address;
    source_location where;
};

struct host_service {
    std::string name;
    rules::protocol proto = rules::protocol::https;
    std::uint16_t port = 0;
    std::string role;  ///< "frontend" or "hub" for Exchange transport; free text otherwise
    source_location where;
};

struct host {
    std::string name;
    std::string network;
    ip_address address;
    std::vector<std::string> names;  ///< DNS names, and the names on its certificate
    std::vector<std::string> accepted_domains;
    /// Instances whose XCLIENT LOGIN the host believes: mail from a sender they
    /// authenticated may relay (Exchange: a connector with Externally Secured permissions).
    std::vector<std::string> xclient_from;
    source_location xclient_from_where;
    std::vector<host_service> services;
    /// The certificate the host presents for its names (Exchange's, exported), when the
    /// topology gives it: only `cert` is needed to compare (a .cer, a PEM, or a PFX).
    std::optional<rules::certificate> certificate;
    /// Exchange's Extended Protection (on by default from Exchange 2019 CU14): Windows
    /// authentication then works through a proxy only if the client sees this host's certificate.
    bool extended_protection = true;
    source_location extended_protection_where;
    source_location where;
    const host_service* service_at(std::uint16_t port) const;
};

struct instance {
    std::string name;
    std::string role;
    std::vector<leg> legs;
    std::string config_file;  ///< where its config was read from (the topology itself if inline)
    std::shared_ptr<const rules::policy> policy;  ///< null when the config failed to load
    source_location where;
    std::optional<ip_address> address_on(const std::string& network) const;
};

struct topology {
    std::string file;
    std::string name;
    std::string description;
    std::string domain;
    std::string mx;  ///< the name SMTP clients connect to
    std::vector<network> networks;  ///< External included, with the lab range clients use
    std::vector<instance> instances;
    std::vector<host> hosts;
    std::map<std::string, std::string> names;  ///< public DNS name -> instance or host
    std::map<std::string, source_location> name_where;
    /// Error codes this topology has on purpose (a lab scenario, `broken_on_purpose` in
    /// [topology]): `check` still reports them; `run` and `lab up` start it anyway.
    std::vector<std::pair<std::string, source_location>> broken_on_purpose;
    bool on_purpose(const rules::diagnostic& d) const;

    const instance* find_instance(std::string_view n) const;
    const host* find_host(std::string_view n) const;
    /// The topology network an address lies in; External when none claims it.
    std::string network_of(const ip_address& a) const;
    /// The instance or host that owns an address (a leg or a host address).
    std::string node_at(const ip_address& a) const;
    std::vector<ip_address> addresses_of(std::string_view node) const;
};

struct load_result {
    std::optional<topology> topo;
    diagnostics diags;
    bool parsed = false;  ///< false: unreadable file or TOML syntax error somewhere
};

/// How a running lab differs from the topology as written.
struct load_settings {
    /// Where lab certificates live: listeners with `issuer = "lab"` get
    /// STATE/pki/<instance>-<listener>.pem/.key, and TLS targets without a ca_file trust
    /// STATE/pki/ca.pem. Empty: paths stay unset (check and explain need none).
    std::string state_dir;
    /// Without the privilege to bind ports below 1024, every such port P (listeners,
    /// targets, host services) becomes mapped_port(P) = 10000 + P.
    bool map_privileged_ports = false;
    /// Moves the whole topology `shift` /16 blocks up inside 127.0.0.0/8: every address and
    /// range 127.B.x.y becomes 127.(B + shift).x.y, so that a second lab (a test's, say) runs
    /// beside the default one. An address pushed past 127.255.255.255 is an error (CFG004).
    int shift = 0;
};

std::uint16_t mapped_port(std::uint16_t port, bool map_privileged);

/// Loads a topology and derives each instance's config (listeners bound on legs, targets
/// naming instances and hosts resolved to addresses).
load_result load(const std::string& path, const load_settings& settings = {});

/// Topology-level findings (TOP*, TLS*, EXCH004 for Extended Protection), on top of each
/// instance's own lint and its certificates' (certs::lint).
void lint(const topology& t, diagnostics& out);

/// What stops `run -t` and `lab up`: every error among `found` (load and lint), except the
/// ones the topology has on purpose.
diagnostics blocking(const topology& t, const diagnostics& found);

}  // namespace dmz::topology
