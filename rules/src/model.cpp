#include "dmz/rules/model.hpp"

namespace dmz::rules {

const char* to_string(protocol p) {
    switch (p) {
    case protocol::http: return "http";
    case protocol::https: return "https";
    case protocol::smtp: return "smtp";
    }
    return "?";
}

const char* to_string(auth_mode m) {
    switch (m) {
    case auth_mode::none: return "none";
    case auth_mode::basic: return "basic";
    case auth_mode::forms: return "forms";
    case auth_mode::pass_through: return "pass-through";
    }
    return "?";
}

const char* to_string(rule_kind k) {
    switch (k) {
    case rule_kind::web: return "web";
    case rule_kind::server: return "server";
    case rule_kind::access: return "access";
    }
    return "?";
}

const char* to_string(delegation d) {
    switch (d) {
    case delegation::none: return "none";
    case delegation::basic: return "basic";
    case delegation::pass_through: return "pass-through";
    }
    return "?";
}

const char* to_string(action a) { return a == action::allow ? "allow" : "deny"; }

std::string bind_endpoint::to_string() const {
    auto a = address.to_string();
    if (!address.is_v4()) a = "[" + a + "]";
    return a + ":" + std::to_string(port);
}

std::string target::describe() const {
    std::string out;
    if (!instance.empty()) out = instance + " ";
    else if (!host.empty()) out = host + " ";
    if (address) {
        auto a = address->to_string();
        out += address->is_v4() ? a : "[" + a + "]";
    } else {
        out += "?";
    }
    out += ":" + std::to_string(port);
    if (tls) out += " (https, verify " + (name.empty() ? std::string("?") : name) + ")";
    return out;
}

const network* instance_config::find_network(std::string_view n) const {
    for (auto& x : networks)
        if (x.name == n) return &x;
    return nullptr;
}

const address_set* instance_config::find_address_set(std::string_view n) const {
    for (auto& x : address_sets)
        if (x.name == n) return &x;
    return nullptr;
}

const listener* instance_config::find_listener(std::string_view n) const {
    for (auto& x : listeners)
        if (x.name == n) return &x;
    return nullptr;
}

const listener* instance_config::listener_at(const ip_address& a, std::uint16_t port) const {
    for (auto& l : listeners)
        for (auto& b : l.bind)
            if (b.port == port && (b.address == a || b.address.is_unspecified())) return &l;
    return nullptr;
}

std::string instance_config::network_of(const ip_address& a) const {
    for (auto& n : networks)
        for (auto& r : n.ranges)
            if (r.contains(a)) return n.name;
    return external_network;
}

std::optional<std::vector<cidr>> instance_config::ranges_of(std::string_view source_name) const {
    if (source_name == external_network) return std::nullopt;
    if (auto* n = find_network(source_name)) return n->ranges;
    if (auto* s = find_address_set(source_name)) return s->ranges;
    return std::vector<cidr>{};
}

}  // namespace dmz::rules
