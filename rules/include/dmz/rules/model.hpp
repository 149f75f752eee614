#pragma once
/// @file The policy model of one instance, as loaded from its config: immutable after load.
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dmz/rules/diagnostic.hpp"
#include "dmz/rules/ip.hpp"

namespace dmz::rules {

using millis = std::chrono::milliseconds;

/// The implicit network: every address no other network claims.
inline constexpr const char* external_network = "External";

struct network {
    std::string name;
    std::vector<cidr> ranges;
    source_location where;
};

/// A named list of ranges. The topology adds one per instance and host, named after it.
struct address_set {
    std::string name;
    std::vector<cidr> ranges;
    source_location where;
    std::string origin;  ///< "" when written in the config, else "instance" or "host"
};

enum class protocol { http, https, smtp };
enum class auth_mode { none, basic, forms, pass_through };
const char* to_string(protocol p);
const char* to_string(auth_mode m);

struct bind_endpoint {
    ip_address address;
    std::uint16_t port = 0;
    source_location where;
    std::string to_string() const;  ///< "127.0.0.1:443", "[::1]:443"
};

struct certificate {
    std::vector<std::string> names;  ///< SNI names this certificate serves (lower case)
    bool lab = false;                ///< issued by the lab CA (`issuer = "lab"`)
    std::string cert_file;      ///< PEM (leaf, then intermediates; may hold the key too) or PKCS#12 (.pfx/.p12)
    std::string key_file;       ///< PEM key; empty: the key is in cert_file
    std::string password_file;  ///< first line: the PFX or encrypted PEM key's password; may be empty
    source_location where;
    source_location names_where, cert_where, key_where, password_where;  ///< each key's own position (else `where`)
};

struct listener_limits {
    std::uint64_t max_request_line = 8 * 1024;
    std::uint64_t max_header_bytes = 64 * 1024;  ///< Kerberos tokens need 64 KiB
    std::uint64_t max_headers = 100;
    std::uint64_t max_connections = 10000;
    std::uint64_t max_message_size = 35 * 1000 * 1000;  ///< SMTP SIZE
    std::uint64_t max_recipients = 100;                  ///< SMTP, RFC 5321 minimum
};

struct listener_timeouts {
    millis head{std::chrono::seconds(30)};   ///< whole request head (slowloris bound)
    millis idle{std::chrono::seconds(1200)};  ///< between requests; Outlook idles 12-15 min
    millis command{std::chrono::seconds(300)};  ///< SMTP, RFC 5321 4.5.3.2.7
};

/// Soft lockout (as AD FS extranet lockout): after `threshold` bad passwords within
/// `window`, a user's further attempts fail without a check until the window passes since
/// the last one; an address with `address_threshold` failures in `window` is refused too.
struct lockout_policy {
    std::uint32_t threshold = 5;           ///< 0: no per-user lockout
    std::uint32_t address_threshold = 20;  ///< 0: no per-address limit
    millis window{std::chrono::minutes(15)};
};

/// Forms sessions (TMG's cookie-based forms authentication): a cookie signed with HMAC
/// under the instance's session key, valid until `idle` passes without a request or
/// `lifetime` passes since the login, whichever comes first.
struct session_policy {
    millis idle{std::chrono::minutes(15)};
    millis lifetime{std::chrono::hours(8)};
    std::string cookie = "DmzSession";
    std::string same_site = "Lax";  ///< Lax, Strict (None is refused: it needs cross-site use)
};

struct listener {
    std::string name;
    protocol proto = protocol::https;
    std::vector<bind_endpoint> bind;
    std::vector<std::string> networks;  ///< topology only: bind on this instance's legs
    std::uint16_t port = 0;             ///< with `networks`
    std::vector<certificate> certificates;
    std::string default_certificate;  ///< a name of one of `certificates`, for clients without SNI
    auth_mode auth = auth_mode::none;
    std::string realm;
    bool redirect_to_https = false;  ///< http listeners: answer 301 to https
    std::string public_name;         ///< SMTP banner and EHLO name
    listener_limits limits;
    listener_timeouts timeouts;
    lockout_policy lockout;
    session_policy session;  ///< forms listeners
    source_location where;
};

struct user {
    std::string name;
    std::vector<std::string> groups;
    source_location where;
};

struct group {
    std::string name;
    std::string description;
    source_location where;
};

enum class rule_kind { web, server, access };
enum class action { allow, deny };
/// Host header toward the upstream: the client's, or the target's name (TMG's "forward the
/// original host header" is `original`).
enum class host_header { original, target };
/// Whether the upstream learns the original client (X-Forwarded-For / PROXY v2) or only sees
/// this tier ("requests appear to come from the proxy").
enum class client_address { forwarded, proxy };
enum class server_mode { smtp, tcp };
/// What the upstream gets of the client's credentials (TMG's delegation): `none` strips
/// them, `basic` forwards the Basic credentials this tier validated, `pass_through` leaves
/// the client's own Authorization (NTLM/Negotiate) untouched for the upstream to judge.
enum class delegation { none, basic, pass_through };
const char* to_string(delegation d);
const char* to_string(rule_kind k);
const char* to_string(action a);

struct rule_timeouts {
    millis connect{std::chrono::seconds(10)};
    millis read{std::chrono::seconds(120)};   ///< waiting for upstream bytes
    millis idle{std::chrono::seconds(1200)};  ///< an idle upstream connection or channel
};

struct target {
    std::string instance;  ///< topology: another instance
    std::string host;      ///< topology: a simulated host
    std::optional<ip_address> address;
    /// Local address to connect from, so the next tier sees this tier's leg on its network.
    /// A topology sets it to the instance's leg on the target's network.
    std::optional<ip_address> source;
    std::uint16_t port = 0;
    bool tls = false;
    std::string name;  ///< verified on the upstream certificate; SNI; Host when host_header=target
    std::string ca_file;
    host_header host_policy = host_header::original;
    client_address client_policy = client_address::forwarded;
    rule_timeouts timeouts;
    server_mode mode = server_mode::smtp;
    /// Server rules: send a PROXY protocol v2 header first, so the next tier learns the
    /// original client. Exchange speaks no PROXY protocol: off toward hosts. A topology
    /// turns it on toward another instance when client_address is forwarded.
    std::optional<bool> proxy_protocol;
    source_location where;
    std::string describe() const;  ///< "back-end 127.20.0.20:443 (https, verify mail.contoso.com)"
};

struct rule {
    std::string name;
    rule_kind kind = rule_kind::web;
    bool enabled = true;
    action act = action::deny;
    bool test = false;  ///< the tier's test rule: left disabled, enabled to tell rule from network
    std::vector<std::string> listeners;
    std::vector<std::string> from;  ///< networks, address sets, topology instances or hosts
    std::vector<std::string> public_names;  ///< lower case; "*.contoso.com" allowed
    std::vector<std::string> paths;         ///< normalized prefixes
    std::vector<std::string> methods;
    std::vector<std::string> users;  ///< "*" = any authenticated user
    std::vector<std::string> groups;
    // server rules (SMTP)
    std::vector<std::string> accepted_domains;  ///< lower case
    std::vector<std::string> relay_from;
    bool relay_authenticated = true;
    std::uint64_t max_body = 0;  ///< 0: no limit beyond the listener's
    std::optional<target> to;
    bool exchange_guards = false;  ///< refuse ProxyShell/ProxyNotShell shapes
    /// Web rules; unset: pass_through on `none`/`pass-through` listeners, basic on `basic`.
    std::optional<delegation> delegate;
    source_location delegation_where;
    std::string template_rule;     ///< the `exchange` rule this was expanded from
    std::string service;           ///< owa, activesync, ... when expanded
    source_location where;
    // Where each list was written (the rule's own position when absent), for findings.
    source_location from_where, relay_from_where, listeners_where, users_where, groups_where;
};

struct instance_config {
    std::string file;
    std::string name;
    std::string role;  ///< "front-end", "back-end" or ""
    std::vector<std::string> trust_forwarded_from;
    source_location trust_forwarded_from_where;
    std::string user_store;  ///< the user store file (dmzproxy users), "" for none
    /// Forms sessions: the key file (created on first use, 0600). Front-ends that share it
    /// accept each other's sessions. "": session.key beside the user store.
    std::string session_key;
    /// The admin endpoint (/metrics, /status, /reload), and the file holding the bearer
    /// token it demands ("" for none; then it must be on loopback).
    std::optional<bind_endpoint> admin;
    std::string admin_token_file;
    std::vector<network> networks;  ///< without External, which is implicit
    std::vector<address_set> address_sets;
    std::vector<listener> listeners;
    std::vector<user> users;
    std::vector<group> groups;
    std::vector<rule> rules;
    source_location where;

    const network* find_network(std::string_view name) const;
    const address_set* find_address_set(std::string_view name) const;
    const listener* find_listener(std::string_view name) const;
    /// The listener bound on address:port (or on the wildcard address with that port).
    const listener* listener_at(const ip_address& a, std::uint16_t port) const;
    /// The one network the address belongs to; External when no network claims it.
    std::string network_of(const ip_address& a) const;
    /// The ranges a source name stands for; nullopt for External (everything unclaimed).
    std::optional<std::vector<cidr>> ranges_of(std::string_view source_name) const;
};

}  // namespace dmz::rules
