#include "dmz/topology/topology.hpp"

#include <algorithm>
#include <filesystem>
#include <set>

#include "dmz/rules/path.hpp"
#include "dmz/rules/toml_reader.hpp"

namespace dmz::topology {

namespace fs = std::filesystem;
using rules::severity;

const host_service* host::service_at(std::uint16_t port) const {
    for (auto& s : services)
        if (s.port == port) return &s;
    return nullptr;
}

std::optional<ip_address> instance::address_on(const std::string& net) const {
    for (auto& l : legs)
        if (l.network == net) return l.address;
    return std::nullopt;
}

bool topology::on_purpose(const rules::diagnostic& d) const {
    if (d.level != rules::severity::error) return false;
    for (auto& [code, where] : broken_on_purpose)
        if (code == d.code) return true;
    return false;
}

diagnostics blocking(const topology& t, const diagnostics& found) {
    diagnostics out;
    for (auto& d : found)
        if (d.level == rules::severity::error && !t.on_purpose(d)) out.push_back(d);
    return out;
}

const instance* topology::find_instance(std::string_view n) const {
    for (auto& i : instances)
        if (i.name == n) return &i;
    return nullptr;
}

const host* topology::find_host(std::string_view n) const {
    for (auto& h : hosts)
        if (h.name == n) return &h;
    return nullptr;
}

std::string topology::network_of(const ip_address& a) const {
    for (auto& n : networks)
        if (n.name != rules::external_network)
            for (auto& r : n.ranges)
                if (r.contains(a)) return n.name;
    return rules::external_network;
}

std::string topology::node_at(const ip_address& a) const {
    for (auto& i : instances)
        for (auto& l : i.legs)
            if (l.address == a) return i.name;
    for (auto& h : hosts)
        if (h.address == a) return h.name;
    return "";
}

std::vector<ip_address> topology::addresses_of(std::string_view node) const {
    std::vector<ip_address> out;
    if (auto* i = find_instance(node))
        for (auto& l : i->legs) out.push_back(l.address);
    if (auto* h = find_host(node)) out.push_back(h->address);
    return out;
}

namespace {

class loader {
public:
    loader(const std::string& file, load_result& res, const load_settings& settings)
        : r_(file, res.diags), res_(res), settings_(settings) {}

    void load(const toml::table& root) {
        topology t;
        t.file = r_.file();
        r_.only_keys(root, "", {"topology", "networks", "instances", "hosts", "names"});
        if (auto* tt = r_.table(root, "topology", "", true)) {
            r_.only_keys(*tt, "topology", {"name", "description", "domain", "mx", "broken_on_purpose"});
            t.name = r_.str(*tt, "name", "topology", true).value_or("");
            t.description = r_.str(*tt, "description", "topology").value_or("");
            t.domain = rules::to_lower(r_.str(*tt, "domain", "topology").value_or(""));
            t.mx = rules::to_lower(r_.str(*tt, "mx", "topology").value_or(t.domain.empty() ? "" : "mail." + t.domain));
            t.broken_on_purpose = r_.located_strings(*tt, "broken_on_purpose", "topology");
        }
        if (auto* nt = r_.table(root, "networks", "", true)) load_networks(*nt, t);
        if (auto* ht = r_.table(root, "hosts", "")) load_hosts(*ht, t);
        if (auto* it = r_.table(root, "instances", "", true)) load_instances(*it, t);
        if (auto* nt = r_.table(root, "names", "")) load_names(*nt, t);
        derive_configs(root, t);
        res_.topo = std::move(t);
    }

private:
    std::optional<ip_address> address(const toml::table& t, const char* key, const std::string& path) {
        auto s = r_.str(t, key, path, true);
        if (!s) return std::nullopt;
        auto a = ip_address::parse(*s);
        if (!a) r_.error("CFG004", r_.at_key(t, key), path + "." + key, "'" + *s + "' is not an IP address");
        else if (!a->is_v4() || a->bytes()[12] != 127)
            r_.error("CFG004", r_.at_key(t, key), path + "." + key,
                     "lab address '" + *s + "' is outside 127.0.0.0/8",
                     "a lab lives on loopback: give each network its own 127.x range");
        else if (auto moved = shifted(*a))
            a = moved;
        else {
            shift_error(r_.at_key(t, key), path + "." + key, *s);
            return std::nullopt; // no follow-on errors about where it lies
        }
        return a;
    }

    /// The address moved settings_.shift /16 blocks up; nullopt when it would leave 127.0.0.0/8.
    std::optional<ip_address> shifted(const ip_address& a) const {
        int block = a.bytes()[13] + settings_.shift;
        if (block > 255)
            return std::nullopt;
        auto bytes = a.bytes();
        bytes[13] = static_cast<std::uint8_t>(block);
        return ip_address::from_bytes(bytes);
    }

    void shift_error(const source_location& where, const std::string& key,
                     const std::string& what) {
        r_.error("CFG004", where, key,
                 "a shift of " + std::to_string(settings_.shift) + " moves " + what +
                     " outside 127.0.0.0/8",
                 "a lab's addresses stay on loopback: give a smaller shift");
    }

    void load_networks(const toml::table& nt, topology& t) {
        bool has_external = false;
        for (auto&& [k, v] : nt) {
            network n;
            n.name = std::string(k.str());
            n.where = r_.at(k);
            auto path = "networks." + n.name;
            auto* tt = v.as_table();
            if (!tt) {
                r_.error("CFG003", r_.at(v), path, "'" + path + "' must be a table");
                continue;
            }
            r_.only_keys(*tt, path, {"ranges", "client_address", "description"});
            r_.str(*tt, "description", path);
            for (auto& [s, where] : r_.located_strings(*tt, "ranges", path, true)) {
                std::string err;
                auto c = rules::cidr::parse(s, &err);
                if (!c) {
                    r_.error("CFG004", where, path + ".ranges", "invalid CIDR: " + err);
                    broken_networks_.insert(n.name);
                }
                else if (settings_.shift == 0 || !c->base().is_v4() || c->base().bytes()[12] != 127)
                    n.ranges.push_back(*c);
                else if (c->prefix() < 16)
                    r_.error("CFG004", where, path + ".ranges",
                             "a shift cannot move " + s + ", wider than a /16");
                else if (auto base = shifted(c->base()))
                    n.ranges.emplace_back(*base, c->prefix128());
                else {
                    shift_error(where, path + ".ranges", s);
                    broken_networks_.insert(n.name);
                }
            }
            if (tt->get("client_address")) {
                n.client_address = address(*tt, "client_address", path);
                if (n.client_address && !broken_networks_.count(n.name) && std::none_of(n.ranges.begin(), n.ranges.end(), [&](auto& r) { return r.contains(*n.client_address); }))
                    r_.error("CFG004", r_.at_key(*tt, "client_address"), path + ".client_address",
                             "client_address " + n.client_address->to_string() + " is not inside network '" + n.name + "'");
            }
            has_external = has_external || n.name == rules::external_network;
            for (auto& other : t.networks)
                for (auto& a : other.ranges)
                    for (auto& b : n.ranges)
                        if (a.overlaps(b)) {
                            r_.error("NET001", n.where, path,
                                     "networks '" + other.name + "' (" + a.to_string() + ") and '" + n.name + "' (" + b.to_string() +
                                         ") overlap; an address must belong to exactly one network",
                                     "split the ranges, or use an address set for the subset");
                            // Which of the two an address lies in is then moot: no follow-on errors.
                            broken_networks_.insert(other.name);
                            broken_networks_.insert(n.name);
                        }
            t.networks.push_back(std::move(n));
        }
        if (!has_external)
            r_.error("CFG008", r_.at(nt), "networks.External",
                     "the topology needs a networks.External table with the range lab clients use",
                     "e.g. [networks.External] ranges = [\"127.10.0.0/16\"]");
    }

    bool known_network(const topology& t, const std::string& n) {
        return std::any_of(t.networks.begin(), t.networks.end(), [&](auto& x) { return x.name == n; });
    }

    std::vector<std::string> network_names(const topology& t) {
        std::vector<std::string> out;
        for (auto& n : t.networks) out.push_back(n.name);
        return out;
    }

    void unknown(const source_location& where, const std::string& key, const std::string& what,
                 const std::string& name, const std::vector<std::string>& known) {
        auto guess = rules::did_you_mean(name, known);
        r_.error("CFG006", where, key, "unknown " + what + " '" + name + "'",
                 guess.empty() ? "" : "did you mean '" + guess + "'?");
    }

    void check_in_network(const topology& t, const std::string& net, const ip_address& a,
                          const source_location& where, const std::string& key) {
        // A network whose ranges are already in error claims nothing: no follow-on errors.
        auto in = t.network_of(a);
        if (in != net && !broken_networks_.count(net) && !broken_networks_.count(in))
            r_.error("CFG004", where, key,
                     "address " + a.to_string() + " lies in network '" + in + "', not '" + net + "'");
    }

    void claim_node(const topology& t, const std::string& name, const source_location& where, const std::string& key) {
        for (auto& i : t.instances)
            if (i.name == name) r_.error("CFG005", where, key, "duplicate node name '" + name + "': an instance at " + i.where.to_string());
        for (auto& h : t.hosts)
            if (h.name == name) r_.error("CFG005", where, key, "duplicate node name '" + name + "': a host at " + h.where.to_string());
        for (auto& n : t.networks)
            if (n.name == name) r_.error("CFG005", where, key, "duplicate name '" + name + "': a network at " + n.where.to_string());
    }

    void claim_address(const topology& t, const ip_address& a, const std::string& owner,
                       const source_location& where, const std::string& key) {
        auto other = t.node_at(a);
        if (!other.empty() && other != owner)
            r_.error("CFG005", where, key, "address " + a.to_string() + " is already taken by '" + other + "'");
    }

    void load_hosts(const toml::table& ht, topology& t) {
        for (auto&& [k, v] : ht) {
            host h;
            h.name = std::string(k.str());
            h.where = r_.at(k);
            auto path = "hosts." + h.name;
            auto* tt = v.as_table();
            if (!tt) {
                r_.error("CFG003", r_.at(v), path, "'" + path + "' must be a table");
                continue;
            }
            r_.only_keys(*tt, path, {"network", "address", "names", "accepted_domains", "xclient_from", "services", "description",
                                     "certificate", "extended_protection"});
            r_.str(*tt, "description", path);
            claim_node(t, h.name, h.where, path);
            h.network = r_.str(*tt, "network", path, true).value_or("");
            if (!h.network.empty() && !known_network(t, h.network))
                unknown(r_.at_key(*tt, "network"), path + ".network", "network", h.network, network_names(t));
            if (auto a = address(*tt, "address", path)) {
                h.address = *a;
                if (known_network(t, h.network)) check_in_network(t, h.network, *a, r_.at_key(*tt, "address"), path + ".address");
                claim_address(t, *a, h.name, r_.at_key(*tt, "address"), path + ".address");
            }
            for (auto& n : r_.strings(*tt, "names", path)) h.names.push_back(rules::to_lower(n));
            for (auto& d : r_.strings(*tt, "accepted_domains", path)) h.accepted_domains.push_back(rules::to_lower(d));
            h.xclient_from = r_.strings(*tt, "xclient_from", path);
            h.xclient_from_where = tt->contains("xclient_from") ? r_.at_key(*tt, "xclient_from") : h.where;
            h.extended_protection = r_.boolean(*tt, "extended_protection", path).value_or(true);
            h.extended_protection_where = tt->contains("extended_protection") ? r_.at_key(*tt, "extended_protection") : h.where;
            if (auto* ct = r_.table(*tt, "certificate", path)) h.certificate = host_certificate(*ct, path + ".certificate", t);
            if (auto* arr = r_.array(*tt, "services", path)) {
                std::size_t idx = 0;
                for (auto& el : *arr) {
                    auto sp = path + ".services[" + std::to_string(idx++) + "]";
                    auto* st = el.as_table();
                    if (!st) {
                        r_.error("CFG003", r_.at(el), sp, "'" + sp + "' must be a table");
                        continue;
                    }
                    r_.only_keys(*st, sp, {"name", "protocol", "port", "role"});
                    host_service s;
                    s.where = r_.at(*st);
                    s.name = r_.str(*st, "name", sp, true).value_or("");
                    if (auto p = r_.str(*st, "protocol", sp, true))
                        if (r_.one_of(*p, *st, "protocol", sp, {"http", "https", "smtp"}))
                            s.proto = *p == "http" ? rules::protocol::http : *p == "https" ? rules::protocol::https : rules::protocol::smtp;
                    if (auto p = r_.integer(*st, "port", sp, 1, 65535, true)) s.port = static_cast<std::uint16_t>(*p);
                    s.role = r_.str(*st, "role", sp).value_or("");
                    h.services.push_back(std::move(s));
                }
            }
            t.hosts.push_back(std::move(h));
        }
    }

    /// A host's certificate files, relative to the topology file.
    rules::certificate host_certificate(const toml::table& ct, const std::string& path, const topology& t) {
        r_.only_keys(ct, path, {"cert", "key", "password_file"});
        rules::certificate c;
        c.where = c.names_where = c.cert_where = c.key_where = c.password_where = r_.at(ct);
        auto dir = fs::path(t.file).parent_path();
        auto file = [&](const char* key, std::string& out, source_location& where, bool required) {
            auto f = r_.str(ct, key, path, required);
            if (!f) return;
            auto p = fs::path(*f);
            out = (p.is_relative() ? dir / p : p).lexically_normal().string();
            where = r_.at_key(ct, key);
            std::error_code ec;
            if (!fs::is_regular_file(out, ec))
                r_.error("CFG007", where, path + "." + key, "file '" + out + "' does not exist",
                         "relative names are resolved from the topology file's folder");
        };
        file("cert", c.cert_file, c.cert_where, true);
        file("key", c.key_file, c.key_where, false);
        file("password_file", c.password_file, c.password_where, false);
        return c;
    }

    void load_instances(const toml::table& it, topology& t) {
        for (auto&& [k, v] : it) {
            instance in;
            in.name = std::string(k.str());
            in.where = r_.at(k);
            auto path = "instances." + in.name;
            auto* tt = v.as_table();
            if (!tt) {
                r_.error("CFG003", r_.at(v), path, "'" + path + "' must be a table");
                continue;
            }
            r_.only_keys(*tt, path, {"role", "legs", "config", "description"});
            r_.str(*tt, "description", path);
            claim_node(t, in.name, in.where, path);
            if (auto role = r_.str(*tt, "role", path, true))
                if (r_.one_of(*role, *tt, "role", path, {"front-end", "back-end", "single"})) in.role = *role;
            if (auto* legs = r_.array(*tt, "legs", path)) {
                std::size_t idx = 0;
                for (auto& el : *legs) {
                    auto lp = path + ".legs[" + std::to_string(idx++) + "]";
                    auto* lt = el.as_table();
                    if (!lt) {
                        r_.error("CFG003", r_.at(el), lp, "'" + lp + "' must be a table");
                        continue;
                    }
                    r_.only_keys(*lt, lp, {"network", "address"});
                    leg l;
                    l.where = r_.at(*lt);
                    l.network = r_.str(*lt, "network", lp, true).value_or("");
                    if (!l.network.empty() && !known_network(t, l.network))
                        unknown(r_.at_key(*lt, "network"), lp + ".network", "network", l.network, network_names(t));
                    if (in.address_on(l.network))
                        r_.error("CFG005", l.where, lp, "instance '" + in.name + "' has two legs on network '" + l.network + "'");
                    auto a = address(*lt, "address", lp);
                    if (!a) continue;
                    l.address = *a;
                    if (known_network(t, l.network)) check_in_network(t, l.network, *a, r_.at_key(*lt, "address"), lp + ".address");
                    claim_address(t, *a, in.name, r_.at_key(*lt, "address"), lp + ".address");
                    in.legs.push_back(l);
                }
            } else {
                r_.error("CFG008", in.where, path + ".legs", "instance '" + in.name + "' has no legs");
            }
            t.instances.push_back(std::move(in));
        }
    }

    void load_names(const toml::table& nt, topology& t) {
        for (auto&& [k, v] : nt) {
            auto name = rules::to_lower(k.str());
            auto path = "names." + std::string(k.str());
            auto* s = v.as_string();
            if (!s) {
                r_.error("CFG003", r_.at(v), path, "'" + path + "' must be the name of an instance or host");
                continue;
            }
            if (!t.find_instance(s->get()) && !t.find_host(s->get())) {
                std::vector<std::string> nodes;
                for (auto& i : t.instances) nodes.push_back(i.name);
                for (auto& h : t.hosts) nodes.push_back(h.name);
                unknown(r_.at(v), path, "instance or host", s->get(), nodes);
                continue;
            }
            t.names[name] = s->get();
            t.name_where[name] = r_.at(k);
        }
    }

    void derive_configs(const toml::table& root, topology& t) {
        rules::load_options base;
        base.in_topology = true;
        for (auto& n : t.networks)
            if (n.name != rules::external_network) base.networks.push_back({n.name, n.ranges, n.where});
        for (auto& i : t.instances) {
            rules::address_set s{i.name, {}, i.where, "instance"};
            for (auto& l : i.legs) s.ranges.emplace_back(l.address, 128);
            base.address_sets.push_back(std::move(s));
        }
        for (auto& h : t.hosts) base.address_sets.push_back({h.name, {rules::cidr(h.address, 128)}, h.where, "host"});

        auto topo_dir = fs::path(t.file).parent_path();
        auto* instances = root["instances"].as_table();
        for (auto& in : t.instances) {
            auto opts = base;
            opts.instance_name = in.name;
            opts.role = in.role;
            auto path = "instances." + in.name;
            auto* it = instances ? (*instances)[in.name].as_table() : nullptr;
            if (!it) continue;
            rules::load_result lr;
            auto* cfg = it->get("config");
            if (!cfg) {
                r_.error("CFG008", in.where, path + ".config",
                         "instance '" + in.name + "' has no config",
                         "config = \"front-end.toml\", or an inline [" + path + ".config] table");
                continue;
            } else if (auto* s = cfg->as_string()) {
                auto p = fs::path(s->get());
                if (p.is_relative()) p = topo_dir / p;
                in.config_file = p.lexically_normal().string();
                std::error_code ec;
                if (!fs::is_regular_file(in.config_file, ec)) {
                    r_.error("CFG007", r_.at(*cfg), path + ".config", "config file '" + in.config_file + "' does not exist");
                    res_.parsed = false;
                    continue;
                }
                lr = rules::load_instance_config(in.config_file, opts);
            } else if (auto* ct = cfg->as_table()) {
                in.config_file = t.file;
                lr = rules::load_instance_config_table(*ct, t.file, topo_dir.empty() ? "." : topo_dir.string(), opts);
            } else {
                r_.error("CFG003", r_.at(*cfg), path + ".config", "'" + path + ".config' must be a file name or a table");
                continue;
            }
            res_.diags.insert(res_.diags.end(), lr.diags.begin(), lr.diags.end());
            if (!lr.parsed) res_.parsed = false;
            if (!lr.config) continue;
            if (lr.config->role.empty()) lr.config->role = in.role;
            derive(t, in, *lr.config);
            in.policy = rules::compile(std::move(*lr.config));
        }
    }

    void derive(const topology& t, const instance& in, rules::instance_config& c) {
        bool map = settings_.map_privileged_ports;
        auto pki = settings_.state_dir.empty() ? std::string() : settings_.state_dir + "/pki";
        // A lab's instances share one user store in the lab state folder.
        auto state = settings_.state_dir.empty() ? std::string("lab-state") : settings_.state_dir;
        if (c.user_store.empty()) c.user_store = state + "/users.toml";
        // ... and one session key, so every front-end of the lab accepts every forms session.
        if (c.session_key.empty()) c.session_key = state + "/session.key";
        for (auto& l : c.listeners) {
            l.port = mapped_port(l.port, map);
            for (auto& b : l.bind) b.port = mapped_port(b.port, map);
            if (!pki.empty())
                for (auto& cert : l.certificates)
                    if (cert.lab) {
                        cert.cert_file = pki + "/" + in.name + "-" + l.name + ".pem";
                        cert.key_file = pki + "/" + in.name + "-" + l.name + ".key";
                    }
        }
        for (auto& l : c.listeners) {
            for (auto& n : l.networks) {
                auto a = in.address_on(n);
                if (!a) {
                    r_.error("TOP003", l.where, "listeners." + l.name + ".networks",
                             "listener '" + l.name + "' listens on network '" + n + "', but instance '" + in.name +
                                 "' has no leg there",
                             "add a leg on '" + n + "' to the instance, or listen on another network");
                    continue;
                }
                l.bind.push_back({*a, l.port, l.where});
            }
        }
        for (auto& r : c.rules) {
            if (!r.to) continue;
            auto& to = *r.to;
            auto key = "rules." + r.name + ".target";
            if (!to.instance.empty()) {
                auto* other = t.find_instance(to.instance);
                if (!other) {
                    std::vector<std::string> names;
                    for (auto& i : t.instances) names.push_back(i.name);
                    unknown(to.where, key + ".instance", "instance", to.instance, names);
                    continue;
                }
                // The other instance's address on the first network both share.
                for (auto& l : in.legs)
                    if (auto a = other->address_on(l.network)) {
                        to.address = a;
                        break;
                    }
                if (!to.address) {
                    r_.error("TOP004", to.where, key,
                             "rule '" + r.name + "' targets instance '" + to.instance + "', which shares no network with '" + in.name + "'",
                             "publish to the next tier on a network both have a leg on");
                    if (!other->legs.empty()) to.address = other->legs.front().address;
                }
                if (to.tls && to.name.empty() && !r.public_names.empty()) to.name = r.public_names.front();
            } else if (!to.host.empty()) {
                auto* h = t.find_host(to.host);
                if (!h) {
                    std::vector<std::string> names;
                    for (auto& x : t.hosts) names.push_back(x.name);
                    unknown(to.where, key + ".host", "host", to.host, names);
                    continue;
                }
                to.address = h->address;
                if (!in.address_on(h->network))
                    r_.error("TOP004", to.where, key,
                             "rule '" + r.name + "' targets host '" + h->name + "' on network '" + h->network + "', where instance '" +
                                 in.name + "' has no leg",
                             "publish through the tier that has a leg on '" + h->network + "'");
                if (to.tls && to.name.empty() && !h->names.empty()) to.name = h->names.front();
            }
            if (to.tls && to.name.empty())
                r_.error("CFG008", to.where, key + ".name", "an https target needs 'name': the name to verify on its certificate");
            if (to.address && !to.source) to.source = in.address_on(t.network_of(*to.address));
            to.port = mapped_port(to.port, map);
            if (to.tls && to.ca_file.empty() && !pki.empty()) to.ca_file = pki + "/ca.pem";
            if (r.kind == rules::rule_kind::server && !to.proxy_protocol)
                to.proxy_protocol = !to.instance.empty() && to.client_policy == rules::client_address::forwarded;
        }
    }

    rules::toml_reader r_;
    load_result& res_;
    const load_settings& settings_;
    std::set<std::string> broken_networks_;  ///< networks with a range in error: they claim no address
};

}  // namespace

std::uint16_t mapped_port(std::uint16_t port, bool map_privileged) {
    return map_privileged && port < 1024 ? static_cast<std::uint16_t>(10000 + port) : port;
}

load_result load(const std::string& path, const load_settings& settings) {
    load_result res;
    auto root = rules::parse_toml_file(path, res.diags);
    if (!root) return res;
    if (root->empty()) {
        res.diags.push_back({rules::severity::error, "CFG009", {path, 1, 1}, "",
                             "'" + path + "' is empty: a topology needs [topology], [networks] and its instances",
                             "start from topology/exchange-two-tier.toml"});
        return res;  // not parsed: nothing to run
    }
    res.parsed = true;
    loader l(path, res, settings);
    l.load(*root);
    if (res.topo && settings.map_privileged_ports)
        for (auto& h : res.topo->hosts)
            for (auto& s : h.services) s.port = mapped_port(s.port, true);
    return res;
}

}  // namespace dmz::topology
