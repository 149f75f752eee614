#include "dmz/rules/config.hpp"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <map>
#include <set>

#include "dmz/rules/path.hpp"
#include "dmz/rules/toml_reader.hpp"

namespace dmz::rules {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

const std::vector<exchange_service_defaults>& exchange_services() {
    static const std::vector<exchange_service_defaults> services = {
        {"owa", "Outlook on the web", {"/owa"}, {"GET", "POST", "HEAD"}, 35000000, 120s, true},
        {"ecp", "Exchange admin center", {"/ecp"}, {"GET", "POST", "HEAD"}, 35000000, 120s, false},
        {"activesync", "ActiveSync", {"/Microsoft-Server-ActiveSync"}, {"OPTIONS", "POST"},
         10ULL * 1024 * 1024, 3600s, true},  // Ping holds up to 3540 s
        {"outlook_anywhere", "Outlook Anywhere (RPC over HTTP)", {"/rpc/rpcproxy.dll"},
         {"RPC_IN_DATA", "RPC_OUT_DATA"}, 2ULL * 1024 * 1024 * 1024, 1200s, true},
        {"mapi", "MAPI over HTTP", {"/mapi"}, {"POST", "GET"}, 64ULL * 1024 * 1024, 900s, true},
        {"ews", "Exchange Web Services", {"/EWS"}, {"GET", "POST"}, 64ULL * 1024 * 1024, 1800s,
         true},
        {"autodiscover", "Autodiscover", {"/autodiscover"}, {"GET", "POST"}, 1024 * 1024, 120s,
         true},
        {"oab", "Offline Address Book", {"/OAB"}, {"GET", "HEAD"}, 64 * 1024, 120s, true},
    };
    return services;
}

namespace {

bool valid_name(const std::string& n) {
    if (n.empty() || n.size() > 64) return false;
    for (char c : n)
        if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.' ||
              c == ' '))
            return false;
    return true;
}

bool valid_hostname(const std::string& h) {
    std::string_view v(h);
    if (v.starts_with("*.")) v.remove_prefix(2);
    if (v.empty() || v.size() > 253) return false;
    for (char c : v)
        if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.')) return false;
    return v.front() != '.' && v.back() != '.' && v.find("..") == std::string_view::npos;
}

bool valid_token(const std::string& m) {
    if (m.empty()) return false;
    for (char c : m)
        if (!(std::isalnum(static_cast<unsigned char>(c)) ||
              std::string_view("!#$%&'*+-.^_`|~").find(c) != std::string_view::npos))
            return false;
    return true;
}

class loader {
public:
    loader(std::string file, std::string base_dir, const load_options& opts, diagnostics& out)
        : r_(std::move(file), out), base_dir_(std::move(base_dir)), opts_(opts), out_(out) {}

    instance_config load(const toml::table& root) {
        instance_config c;
        c.file = r_.file();
        c.where = r_.at(root);
        r_.only_keys(root, "", {"instance", "networks", "address_sets", "listeners", "users",
                                "groups", "rules"});
        c.name = opts_.instance_name;
        c.role = opts_.role;
        if (auto* t = r_.table(root, "instance", "")) load_instance(*t, c);
        if (c.name.empty()) c.name = fs::path(r_.file()).stem().string();

        c.networks = opts_.networks;
        c.address_sets = opts_.address_sets;
        if (auto* t = r_.table(root, "networks", "")) load_networks(*t, c);
        if (auto* t = r_.table(root, "address_sets", "")) load_address_sets(*t, c);
        check_network_overlaps(c);
        if (auto* t = r_.table(root, "listeners", "")) load_listeners(*t, c);
        if (auto* t = r_.table(root, "groups", "")) load_groups(*t, c);
        if (auto* t = r_.table(root, "users", "")) load_users(*t, c);
        if (auto* a = r_.array(root, "rules", "")) load_rules(*a, c);
        check_references(c);
        return c;
    }

private:
    std::string resolve_file(const std::string& f) const {
        if (f.empty() || fs::path(f).is_absolute()) return f;
        return (fs::path(base_dir_) / f).lexically_normal().string();
    }

    void require_file(const std::string& path, const source_location& where,
                      const std::string& key) {
        std::error_code ec;
        if (!fs::is_regular_file(path, ec))
            r_.error("CFG007", where, key, "file '" + path + "' does not exist",
                     "relative names are resolved from the config file's folder");
    }

    void load_instance(const toml::table& t, instance_config& c) {
        r_.only_keys(t, "instance", {"name", "role", "trust_forwarded_from", "user_store", "session_key", "description", "admin",
                                     "admin_token_file"});
        if (auto u = r_.str(t, "user_store", "instance")) c.user_store = resolve_file(*u);
        if (auto a = r_.str(t, "admin", "instance")) c.admin = parse_bind(*a, r_.at_key(t, "admin"), "instance.admin");
        if (auto f = r_.str(t, "admin_token_file", "instance")) {
            c.admin_token_file = resolve_file(*f);
            require_file(c.admin_token_file, r_.at_key(t, "admin_token_file"), "instance.admin_token_file");
        }
        if (c.admin && c.admin_token_file.empty() && !c.admin->address.is_loopback())
            r_.error("CFG004", r_.at_key(t, "admin"), "instance.admin",
                     "the admin endpoint " + c.admin->to_string() + " is not on loopback and has no token",
                     "bind it to 127.0.0.1, or set admin_token_file (a bearer token every request must carry)");
        if (auto u = r_.str(t, "session_key", "instance")) c.session_key = resolve_file(*u);
        if (auto n = r_.str(t, "name", "instance")) {
            if (opts_.in_topology && *n != opts_.instance_name)
                r_.error("CFG004", r_.at_key(t, "name"), "instance.name",
                         "instance.name '" + *n + "' differs from the topology's name '" +
                             opts_.instance_name + "'",
                         "remove instance.name; the topology names its instances");
            else
                c.name = *n;
        }
        if (auto role = r_.str(t, "role", "instance")) {
            if (r_.one_of(*role, t, "role", "instance", {"front-end", "back-end", "single"}))
                c.role = *role;
        }
        c.trust_forwarded_from_where = r_.at_key(t, "trust_forwarded_from");
        trust_from_ = r_.located_strings(t, "trust_forwarded_from", "instance");
        for (auto& [n, w] : trust_from_) c.trust_forwarded_from.push_back(n);
        r_.str(t, "description", "instance");
    }

    std::vector<cidr> read_ranges(const toml::table& t, const std::string& path) {
        std::vector<cidr> out;
        auto* n = t.get("ranges");
        auto texts = r_.strings(t, "ranges", path, true);
        std::size_t idx = 0;
        for (auto& s : texts) {
            std::string err;
            auto c = cidr::parse(s, &err);
            const toml::node* el = n && n->as_array() ? n->as_array()->get(idx) : n;
            auto where = el ? r_.at(*el) : r_.at(t);
            if (!c) {
                r_.error("CFG004", where, path + ".ranges[" + std::to_string(idx) + "]",
                         "invalid CIDR: " + err);
            } else {
                out.push_back(*c);
            }
            ++idx;
        }
        return out;
    }

    bool claim_name(const std::string& name, const source_location& where, const std::string& key,
                    const instance_config& c) {
        if (!valid_name(name)) {
            r_.error("CFG004", where, key,
                     "'" + name + "' is not a valid name",
                     "use letters, digits, '-', '_', '.' and spaces, at most 64 characters");
            return false;
        }
        const source_location* prev = nullptr;
        std::string what;
        if (name == external_network) {
            r_.error("CFG005", where, key,
                     "'External' is the implicit network of every address no other network "
                     "claims; it cannot be defined",
                     "rename it, or leave it out: External needs no ranges");
            return false;
        }
        if (auto* n = c.find_network(name)) prev = &n->where, what = "network";
        else if (auto* s = c.find_address_set(name)) prev = &s->where, what = s->origin.empty() ? "address set" : "topology " + s->origin;
        if (prev) {
            r_.error("CFG005", where, key,
                     "duplicate name '" + name + "': already a " + what + " at " +
                         prev->to_string(),
                     "networks, address sets and topology nodes share one namespace");
            return false;
        }
        return true;
    }

    void load_networks(const toml::table& t, instance_config& c) {
        for (auto&& [k, v] : t) {
            std::string name(k.str());
            auto path = "networks." + name;
            auto* nt = v.as_table();
            if (!nt) {
                r_.error("CFG003", r_.at(v), path, "'" + path + "' must be a table");
                continue;
            }
            r_.only_keys(*nt, path, {"ranges", "description"});
            r_.str(*nt, "description", path);
            auto ranges = read_ranges(*nt, path);
            if (!claim_name(name, r_.at(k), path, c)) continue;
            c.networks.push_back({name, std::move(ranges), r_.at(k)});
        }
    }

    void load_address_sets(const toml::table& t, instance_config& c) {
        for (auto&& [k, v] : t) {
            std::string name(k.str());
            auto path = "address_sets." + name;
            auto* nt = v.as_table();
            if (!nt) {
                r_.error("CFG003", r_.at(v), path, "'" + path + "' must be a table");
                continue;
            }
            r_.only_keys(*nt, path, {"ranges", "description"});
            r_.str(*nt, "description", path);
            auto ranges = read_ranges(*nt, path);
            if (!claim_name(name, r_.at(k), path, c)) continue;
            c.address_sets.push_back({name, std::move(ranges), r_.at(k), ""});
        }
    }

    void check_network_overlaps(const instance_config& c) {
        // The first networks are the topology's: it reports their overlaps itself, once.
        std::size_t inherited = opts_.networks.size();
        for (std::size_t i = 0; i < c.networks.size(); ++i)
            for (std::size_t j = std::max(i + 1, inherited); j < c.networks.size(); ++j)
                for (auto& a : c.networks[i].ranges)
                    for (auto& b : c.networks[j].ranges)
                        if (a.overlaps(b))
                            r_.error("NET001", c.networks[j].where,
                                     "networks." + c.networks[j].name,
                                     "networks '" + c.networks[i].name + "' (" + a.to_string() +
                                         ") and '" + c.networks[j].name + "' (" + b.to_string() +
                                         ") overlap; an address must belong to exactly one network",
                                     "split the ranges, or use an address set for the subset");
    }

    void load_listeners(const toml::table& t, instance_config& c) {
        for (auto&& [k, v] : t) {
            listener l;
            l.name = std::string(k.str());
            l.where = r_.at(k);
            auto path = "listeners." + l.name;
            auto* lt = v.as_table();
            if (!lt) {
                r_.error("CFG003", r_.at(v), path, "'" + path + "' must be a table");
                continue;
            }
            if (!valid_name(l.name))
                r_.error("CFG004", l.where, path, "'" + l.name + "' is not a valid listener name");
            r_.only_keys(*lt, path,
                         {"protocol", "bind", "networks", "port", "certificates",
                          "default_certificate", "authentication", "realm", "redirect_to_https",
                          "public_name", "limits", "timeouts", "lockout", "session", "description"});
            if (auto* so = r_.table(*lt, "session", path)) {
                auto sp = path + ".session";
                r_.only_keys(*so, sp, {"idle", "lifetime", "cookie", "same_site"});
                if (auto x = r_.duration(*so, "idle", sp)) l.session.idle = *x;
                if (auto x = r_.duration(*so, "lifetime", sp)) l.session.lifetime = *x;
                if (auto x = r_.str(*so, "cookie", sp)) {
                    bool ok = !x->empty() && x->size() <= 64;
                    for (char ch : *x) ok = ok && (std::isalnum(static_cast<unsigned char>(ch)) || ch == '_' || ch == '-');
                    if (ok) l.session.cookie = *x;
                    else r_.error("CFG004", r_.at_key(*so, "cookie"), sp + ".cookie", "'" + *x + "' is not a cookie name (letters, digits, '_' and '-', at most 64)");
                }
                if (auto x = r_.str(*so, "same_site", sp))
                    if (r_.one_of(*x, *so, "same_site", sp, {"Lax", "Strict"})) l.session.same_site = *x;
            }
            if (auto* lo = r_.table(*lt, "lockout", path)) {
                auto lp = path + ".lockout";
                r_.only_keys(*lo, lp, {"threshold", "address_threshold", "window"});
                if (auto x = r_.integer(*lo, "threshold", lp, 0, 1000)) l.lockout.threshold = static_cast<std::uint32_t>(*x);
                if (auto x = r_.integer(*lo, "address_threshold", lp, 0, 100000)) l.lockout.address_threshold = static_cast<std::uint32_t>(*x);
                if (auto x = r_.duration(*lo, "window", lp)) l.lockout.window = *x;
            }
            r_.str(*lt, "description", path);
            bool proto_known = false;
            if (auto p = r_.str(*lt, "protocol", path, true)) {
                if (r_.one_of(*p, *lt, "protocol", path, {"http", "https", "smtp"})) {
                    l.proto = *p == "http" ? protocol::http
                              : *p == "https" ? protocol::https
                                              : protocol::smtp;
                    proto_known = true;
                }
            }
            load_bind(*lt, path, l);
            load_certificates(*lt, path, l, proto_known);
            if (auto a = r_.str(*lt, "authentication", path)) {
                if (r_.one_of(*a, *lt, "authentication", path,
                              {"none", "basic", "forms", "pass-through"}))
                    l.auth = *a == "none"    ? auth_mode::none
                             : *a == "basic" ? auth_mode::basic
                             : *a == "forms" ? auth_mode::forms
                                             : auth_mode::pass_through;
            }
            if (auto s = r_.str(*lt, "realm", path)) l.realm = *s;
            if (auto b = r_.boolean(*lt, "redirect_to_https", path)) {
                l.redirect_to_https = *b;
                if (*b && l.proto != protocol::http)
                    r_.error("CFG004", r_.at_key(*lt, "redirect_to_https"),
                             path + ".redirect_to_https",
                             "redirect_to_https only applies to http listeners");
            }
            if (auto s = r_.str(*lt, "public_name", path)) {
                l.public_name = to_lower(*s);
                if (!valid_hostname(l.public_name))
                    r_.error("CFG004", r_.at_key(*lt, "public_name"), path + ".public_name",
                             "'" + *s + "' is not a host name");
            }
            if (auto* lim = r_.table(*lt, "limits", path)) {
                auto lp = path + ".limits";
                r_.only_keys(*lim, lp, {"max_request_line", "max_header_bytes", "max_headers",
                                        "max_connections", "max_message_size",
                                        "max_recipients"});
                if (auto x = r_.size(*lim, "max_request_line", lp)) l.limits.max_request_line = *x;
                if (auto x = r_.size(*lim, "max_header_bytes", lp)) l.limits.max_header_bytes = *x;
                if (auto x = r_.integer(*lim, "max_headers", lp, 1, 10000)) l.limits.max_headers = static_cast<std::uint64_t>(*x);
                if (auto x = r_.integer(*lim, "max_connections", lp, 1, 10000000)) l.limits.max_connections = static_cast<std::uint64_t>(*x);
                if (auto x = r_.size(*lim, "max_message_size", lp)) l.limits.max_message_size = *x;
                if (auto x = r_.integer(*lim, "max_recipients", lp, 1, 100000)) {
                    l.limits.max_recipients = static_cast<std::uint64_t>(*x);
                    if (*x < 100)
                        r_.report(severity::warning, "SMTP003", r_.at_key(*lim, "max_recipients"),
                                  lp + ".max_recipients",
                                  "RFC 5321 requires accepting at least 100 recipients");
                }
                if (l.limits.max_header_bytes < 64 * 1024 && l.proto != protocol::smtp)
                    r_.report(severity::warning, "LST003", r_.at_key(*lim, "max_header_bytes"),
                              lp + ".max_header_bytes",
                              "header limit below 64 KiB: Kerberos tokens of large users will be "
                              "refused with 431");
            }
            if (auto* to = r_.table(*lt, "timeouts", path)) {
                auto tp = path + ".timeouts";
                r_.only_keys(*to, tp, {"head", "idle", "command"});
                if (auto x = r_.duration(*to, "head", tp)) l.timeouts.head = *x;
                if (auto x = r_.duration(*to, "idle", tp)) l.timeouts.idle = *x;
                if (auto x = r_.duration(*to, "command", tp)) {
                    l.timeouts.command = *x;
                    if (*x < 300s)
                        r_.report(severity::warning, "SMTP004", r_.at_key(*to, "command"),
                                  tp + ".command",
                                  "RFC 5321 asks servers to wait at least 5 minutes for a command");
                }
            }
            if (c.find_listener(l.name)) {
                r_.error("CFG005", l.where, path, "duplicate listener '" + l.name + "'");
                continue;
            }
            c.listeners.push_back(std::move(l));
        }
    }

    void load_bind(const toml::table& lt, const std::string& path, listener& l) {
        auto* bind_node = lt.get("bind");
        auto binds = r_.strings(lt, "bind", path);
        l.networks = r_.strings(lt, "networks", path);
        if (auto p = r_.integer(lt, "port", path, 1, 65535)) l.port = static_cast<std::uint16_t>(*p);
        if (!l.networks.empty() && !opts_.in_topology)
            r_.error("CFG004", r_.at_key(lt, "networks"), path + ".networks",
                     "listeners bind by network only inside a topology",
                     "give 'bind = [\"ADDRESS:PORT\"]' instead");
        if (!l.networks.empty() && l.port == 0)
            r_.error("CFG008", r_.at_key(lt, "networks"), path + ".port",
                     "a listener bound by 'networks' needs 'port'");
        if (binds.empty() && l.networks.empty())
            r_.error("CFG008", r_.at(lt), path + ".bind",
                     "listener '" + l.name + "' has neither 'bind' nor 'networks'",
                     opts_.in_topology ? "add networks = [\"External\"] and port = 443"
                                       : "add bind = [\"127.0.0.1:443\"]");
        std::size_t idx = 0;
        for (auto& b : binds) {
            const toml::node* el = bind_node && bind_node->as_array()
                                       ? bind_node->as_array()->get(idx)
                                       : bind_node;
            auto where = el ? r_.at(*el) : l.where;
            auto key = path + ".bind[" + std::to_string(idx++) + "]";
            if (auto e = parse_bind(b, where, key)) l.bind.push_back(*e);
        }
    }

    /// "ADDRESS:PORT" ("127.0.0.1:443", "[::1]:443"), or an error at `where`.
    std::optional<bind_endpoint> parse_bind(const std::string& b, const source_location& where, const std::string& key) {
        auto colon = b.rfind(':');
        std::optional<ip_address> a;
        int port = -1;
        if (colon != std::string::npos) {
            a = ip_address::parse(std::string_view(b).substr(0, colon));
            auto ps = b.substr(colon + 1);
            if (!ps.empty() && ps.size() <= 5 &&
                std::all_of(ps.begin(), ps.end(), [](char ch) { return std::isdigit(static_cast<unsigned char>(ch)); }))
                port = std::stoi(ps);
        }
        auto host = colon == std::string::npos ? std::string() : b.substr(0, colon);
        bool name_like = !host.empty() && std::any_of(host.begin(), host.end(), [](char ch) { return std::isalpha(static_cast<unsigned char>(ch)); }) &&
                         std::all_of(host.begin(), host.end(), [](char ch) { return std::isalnum(static_cast<unsigned char>(ch)) || ch == '.' || ch == '-'; });
        if (!a && name_like && port >= 1 && port <= 65535) {
            // A name: binding follows the config, never a resolver's answer of the day.
            bool local = to_lower(host) == "localhost";
            r_.error("CFG004", where, key,
                     "'" + host + "' is a name; a listener binds an IP address, so that what it listens on does not "
                     "change with DNS or /etc/hosts",
                     local ? "localhost is 127.0.0.1 (IPv4) or ::1 (IPv6): write \"127.0.0.1:" + std::to_string(port) +
                                 "\" or \"[::1]:" + std::to_string(port) + "\""
                           : "write the address the name stands for, e.g. \"192.0.2.10:" + std::to_string(port) +
                                 "\" (getent hosts " + host + " shows it)");
            return std::nullopt;
        }
        if (!a || port < 1 || port > 65535) {
            r_.error("CFG004", where, key, "'" + b + "' is not ADDRESS:PORT",
                     "e.g. \"127.10.0.10:443\", \"0.0.0.0:25\" or \"[::1]:443\"");
            return std::nullopt;
        }
        if (b.front() != '[' && !a->is_v4()) {
            r_.error("CFG004", where, key, "IPv6 bind addresses need brackets: \"[::1]:443\"");
            return std::nullopt;
        }
        return bind_endpoint{*a, static_cast<std::uint16_t>(port), where};
    }

    /// `proto_known`: the protocol was given and valid. A missing or misspelt protocol is
    /// already reported; demanding certificates for the https default would be a second,
    /// wrong error.
    void load_certificates(const toml::table& lt, const std::string& path, listener& l,
                           bool proto_known) {
        if (auto* a = r_.array(lt, "certificates", path)) {
            std::size_t idx = 0;
            for (auto& el : *a) {
                auto cp = path + ".certificates[" + std::to_string(idx++) + "]";
                auto* ct = el.as_table();
                if (!ct) {
                    r_.error("CFG003", r_.at(el), cp, "'" + cp + "' must be a table");
                    continue;
                }
                r_.only_keys(*ct, cp, {"names", "cert", "key", "password_file", "issuer"});
                certificate cert;
                cert.where = r_.at(*ct);
                cert.names_where = ct->contains("names") ? r_.at_key(*ct, "names") : cert.where;
                for (auto& n : r_.strings(*ct, "names", cp, true)) {
                    cert.names.push_back(to_lower(n));
                    if (!valid_hostname(cert.names.back()))
                        r_.error("CFG004", r_.at_key(*ct, "names"), cp + ".names",
                                 "'" + n + "' is not a host name");
                }
                auto issuer = r_.str(*ct, "issuer", cp);
                if (issuer && r_.one_of(*issuer, *ct, "issuer", cp, {"lab", "file"}) &&
                    *issuer == "lab") {
                    cert.lab = true;
                    if (!opts_.in_topology)
                        r_.error("CFG004", r_.at_key(*ct, "issuer"), cp + ".issuer",
                                 "lab-issued certificates exist only inside a topology",
                                 "give 'cert' and 'key' files, or make them with 'dmzproxy certs issue'");
                } else {
                    load_certificate_files(*ct, cp, cert);
                }
                l.certificates.push_back(std::move(cert));
            }
        }
        if (auto d = r_.str(lt, "default_certificate", path)) {
            l.default_certificate = to_lower(*d);
            bool found = false;
            for (auto& c : l.certificates)
                for (auto& n : c.names) found = found || n == l.default_certificate;
            if (!found)
                r_.error("CFG006", r_.at_key(lt, "default_certificate"),
                         path + ".default_certificate",
                         "default_certificate '" + *d + "' is not a name of any certificate of this listener");
        }
        if (proto_known && l.proto == protocol::https && l.certificates.empty())
            r_.error("CFG008", l.where, path + ".certificates",
                     "https listener '" + l.name + "' has no certificate",
                     "add certificates = [{ names = [\"mail.contoso.com\"], cert = \"...\", key = \"...\" }]");
    }

    /// `cert` is required; `key` only when the key is not in the cert file (a PFX, or a PEM
    /// holding both), which the certificate loader in certs/ finds out.
    void load_certificate_files(const toml::table& ct, const std::string& cp, certificate& cert) {
        cert.cert_where = cert.key_where = cert.password_where = cert.where;
        if (auto f = r_.str(ct, "cert", cp, true)) {
            cert.cert_file = resolve_file(*f);
            cert.cert_where = r_.at_key(ct, "cert");
            require_file(cert.cert_file, cert.cert_where, cp + ".cert");
        }
        if (auto f = r_.str(ct, "key", cp)) {
            cert.key_file = resolve_file(*f);
            cert.key_where = r_.at_key(ct, "key");
            require_file(cert.key_file, cert.key_where, cp + ".key");
        }
        if (auto f = r_.str(ct, "password_file", cp)) {
            cert.password_file = resolve_file(*f);
            cert.password_where = r_.at_key(ct, "password_file");
            require_file(cert.password_file, cert.password_where, cp + ".password_file");
        }
    }

    void load_groups(const toml::table& t, instance_config& c) {
        for (auto&& [k, v] : t) {
            group g{std::string(k.str()), "", r_.at(k)};
            auto path = "groups." + g.name;
            auto* gt = v.as_table();
            if (!gt) {
                r_.error("CFG003", r_.at(v), path, "'" + path + "' must be a table");
                continue;
            }
            r_.only_keys(*gt, path, {"description"});
            if (auto d = r_.str(*gt, "description", path)) g.description = *d;
            if (!valid_name(g.name)) r_.error("CFG004", g.where, path, "'" + g.name + "' is not a valid group name");
            c.groups.push_back(std::move(g));
        }
    }

    void load_users(const toml::table& t, instance_config& c) {
        for (auto&& [k, v] : t) {
            user u{std::string(k.str()), {}, r_.at(k)};
            auto path = "users." + u.name;
            auto* ut = v.as_table();
            if (!ut) {
                r_.error("CFG003", r_.at(v), path, "'" + path + "' must be a table");
                continue;
            }
            r_.only_keys(*ut, path, {"groups", "description"});
            r_.str(*ut, "description", path);
            for (auto& [g, where] : r_.located_strings(*ut, "groups", path)) {
                // An init-capture: clang 14 cannot capture a structured binding itself.
                bool ok = std::any_of(c.groups.begin(), c.groups.end(), [&g = g](auto& x) { return x.name == g; });
                if (!ok) dangling(where, path + ".groups", "group", g, group_names(c));
                u.groups.push_back(g);
            }
            c.users.push_back(std::move(u));
        }
    }

    std::vector<std::string> group_names(const instance_config& c) {
        std::vector<std::string> out;
        for (auto& g : c.groups) out.push_back(g.name);
        return out;
    }

    void dangling(const source_location& where, const std::string& key, const std::string& what,
                  const std::string& name, const std::vector<std::string>& known) {
        auto guess = did_you_mean(name, known);
        std::string hint = guess.empty() ? "" : "did you mean '" + guess + "'?";
        if (hint.empty() && !known.empty()) {
            hint = "known: ";
            for (std::size_t i = 0; i < known.size() && i < 12; ++i) hint += (i ? ", " : "") + known[i];
        }
        r_.error("CFG006", where, key, "unknown " + what + " '" + name + "'", hint);
    }

    /// `name_defaulted`: the caller fills an empty `name` (the Exchange stanza uses its
    /// public name), so a missing one is not an error here.
    target load_target(const toml::table& t, const std::string& path, rule_kind kind,
                       bool name_defaulted = false) {
        target to;
        to.where = r_.at(t);
        r_.only_keys(t, path, {"instance", "host", "address", "source", "port", "tls", "name", "ca_file",
                               "host_header", "client_address", "timeouts", "mode", "proxy_protocol"});
        if (auto b = r_.boolean(t, "proxy_protocol", path)) {
            if (kind != rule_kind::server)
                r_.error("CFG004", r_.at_key(t, "proxy_protocol"), path + ".proxy_protocol",
                         "'proxy_protocol' applies to server rules only; HTTP carries the client in X-Forwarded-For");
            to.proxy_protocol = *b;
        }
        if (auto s = r_.str(t, "source", path)) {
            to.source = ip_address::parse(*s);
            if (!to.source)
                r_.error("CFG004", r_.at_key(t, "source"), path + ".source", "'" + *s + "' is not an IP address");
        }
        if (auto s = r_.str(t, "instance", path)) to.instance = *s;
        if (auto s = r_.str(t, "host", path)) to.host = *s;
        if (auto s = r_.str(t, "address", path)) {
            to.address = ip_address::parse(*s);
            if (!to.address)
                r_.error("CFG004", r_.at_key(t, "address"), path + ".address",
                         "'" + *s + "' is not an IP address");
        }
        int given = !to.instance.empty() + !to.host.empty() + (t.get("address") != nullptr);
        if (given == 0)
            r_.error("CFG008", to.where, path,
                     "target needs one of 'instance', 'host' or 'address'",
                     opts_.in_topology ? "e.g. instance = \"back-end\"" : "e.g. address = \"127.20.0.20\"");
        else if (given > 1)
            r_.error("CFG004", to.where, path,
                     "target gives more than one of 'instance', 'host' and 'address'");
        if ((!to.instance.empty() || !to.host.empty()) && !opts_.in_topology)
            r_.error("CFG004", r_.at_key(t, to.instance.empty() ? "host" : "instance"),
                     path + (to.instance.empty() ? ".host" : ".instance"),
                     "targets name topology nodes only inside a topology",
                     "give 'address' instead");
        if (auto p = r_.integer(t, "port", path, 1, 65535, true)) to.port = static_cast<std::uint16_t>(*p);
        if (auto b = r_.boolean(t, "tls", path)) to.tls = *b;
        if (auto s = r_.str(t, "name", path)) {
            to.name = to_lower(*s);
            if (!valid_hostname(to.name) || to.name.starts_with("*."))
                r_.error("CFG004", r_.at_key(t, "name"), path + ".name", "'" + *s + "' is not a host name");
        }
        if (auto s = r_.str(t, "ca_file", path)) {
            to.ca_file = resolve_file(*s);
            require_file(to.ca_file, r_.at_key(t, "ca_file"), path + ".ca_file");
        }
        if (auto s = r_.str(t, "host_header", path))
            if (r_.one_of(*s, t, "host_header", path, {"original", "target"}))
                to.host_policy = *s == "original" ? host_header::original : host_header::target;
        if (auto s = r_.str(t, "client_address", path))
            if (r_.one_of(*s, t, "client_address", path, {"forwarded", "proxy"}))
                to.client_policy = *s == "forwarded" ? client_address::forwarded : client_address::proxy;
        if (auto s = r_.str(t, "mode", path)) {
            if (kind != rule_kind::server)
                r_.error("CFG004", r_.at_key(t, "mode"), path + ".mode", "'mode' applies to server rules only");
            else if (r_.one_of(*s, t, "mode", path, {"smtp", "tcp"}))
                to.mode = *s == "smtp" ? server_mode::smtp : server_mode::tcp;
        }
        if (auto* tt = r_.table(t, "timeouts", path)) {
            auto tp = path + ".timeouts";
            r_.only_keys(*tt, tp, {"connect", "read", "idle"});
            if (auto x = r_.duration(*tt, "connect", tp)) to.timeouts.connect = *x;
            if (auto x = r_.duration(*tt, "read", tp)) to.timeouts.read = *x;
            if (auto x = r_.duration(*tt, "idle", tp)) to.timeouts.idle = *x;
        }
        if (to.tls && to.name.empty() && kind == rule_kind::web && to.host.empty() && to.instance.empty() &&
            !name_defaulted)
            r_.error("CFG008", to.where, path + ".name",
                     "an https target needs 'name': the name to verify on its certificate",
                     "the name also needs to be on the upstream's trusted certificate");
        return to;
    }

    void load_conditions(const toml::table& rt, const std::string& path, rule& ru,
                         const instance_config& c) {
        ru.listeners_where = r_.at_key(rt, "listeners");
        ru.users_where = r_.at_key(rt, "users");
        ru.groups_where = r_.at_key(rt, "groups");
        ru.from_where = r_.at_key(rt, "from");
        std::vector<std::string> listener_names;
        for (auto& l : c.listeners) listener_names.push_back(l.name);
        for (auto& [ln, where] : r_.located_strings(rt, "listeners", path)) {
            auto* l = c.find_listener(ln);
            ru.listeners.push_back(ln);
            if (!l) {
                dangling(where, path + ".listeners", "listener", ln, listener_names);
                continue;
            }
            bool web = l->proto != protocol::smtp;
            if (ru.template_rule.empty() && ru.kind == rule_kind::web && !web)
                r_.error("CFG004", where, path + ".listeners",
                         "web rule '" + ru.name + "' names smtp listener '" + ln + "'",
                         "use a server rule for SMTP");
            if (ru.template_rule.empty() && ru.kind == rule_kind::server && web)
                r_.error("CFG004", where, path + ".listeners",
                         "server rule '" + ru.name + "' names " + to_string(l->proto) +
                             " listener '" + ln + "'",
                         "use a web rule for HTTP publishing");
        }
        for (auto& [s, where] : r_.located_strings(rt, "from", path)) {
            check_source(c, s, where, path + ".from");
            ru.from.push_back(s);
        }
        for (auto& [n, where] : r_.located_strings(rt, "public_names", path)) {
            ru.public_names.push_back(to_lower(n));
            if (!valid_hostname(ru.public_names.back()))
                r_.error("CFG004", where, path + ".public_names", "'" + n + "' is not a host name");
        }
        for (auto& [p, where] : r_.located_strings(rt, "paths", path)) add_path(p, where, path + ".paths", ru);
        for (auto& [m, where] : r_.located_strings(rt, "methods", path)) {
            if (!valid_token(m))
                r_.error("CFG004", where, path + ".methods", "'" + m + "' is not an HTTP method");
            ru.methods.push_back(m);
        }
        std::vector<std::string> user_names{"*"};
        for (auto& u : c.users) user_names.push_back(u.name);
        for (auto& [u, where] : r_.located_strings(rt, "users", path)) {
            if (std::find(user_names.begin(), user_names.end(), u) == user_names.end())
                dangling(where, path + ".users", "user", u, user_names);
            ru.users.push_back(u);
        }
        for (auto& [g, where] : r_.located_strings(rt, "groups", path)) {
            if (std::none_of(c.groups.begin(), c.groups.end(), [&g = g](auto& x) { return x.name == g; }))
                dangling(where, path + ".groups", "group", g, group_names(c));
            ru.groups.push_back(g);
        }
    }

    void load_delegation(const toml::table& rt, const std::string& path, rule& ru) {
        if (auto d = r_.str(rt, "delegation", path)) {
            ru.delegation_where = r_.at_key(rt, "delegation");
            if (r_.one_of(*d, rt, "delegation", path, {"none", "basic", "pass-through"}))
                ru.delegate = *d == "none" ? delegation::none : *d == "basic" ? delegation::basic : delegation::pass_through;
        }
    }

    void check_source(const instance_config& c, const std::string& s, const source_location& where,
                      const std::string& key) {
        if (!known_source(c, s)) dangling(where, key, "network or address set", s, source_names(c));
    }

    void add_path(const std::string& p, const source_location& where, const std::string& key, rule& ru) {
        auto n = normalize_target(p);
        if (!n.safe() || !n.query.empty() || p.find('?') != std::string::npos) {
            r_.error("CFG004", where, key,
                     "path prefix '" + p + "' is not a plain path" + (n.safe() ? "" : ": " + n.unsafe),
                     "write a prefix such as \"/owa\"");
            return;
        }
        auto norm = n.path;
        if (norm.size() > 1 && norm.back() == '/') norm.pop_back();
        ru.paths.push_back(norm);
    }

    void load_rules(const toml::array& a, instance_config& c) {
        std::size_t idx = 0;
        for (auto& el : a) {
            auto path = "rules[" + std::to_string(idx++) + "]";
            auto* rt = el.as_table();
            if (!rt) {
                r_.error("CFG003", r_.at(el), path, "'" + path + "' must be a table");
                continue;
            }
            rule ru;
            ru.where = r_.at(*rt);
            auto name = r_.str(*rt, "name", path, true);
            if (name) {
                ru.name = *name;
                path = "rules." + ru.name;
                if (!valid_name(ru.name))
                    r_.error("CFG004", r_.at_key(*rt, "name"), path + ".name", "'" + ru.name + "' is not a valid rule name");
            }
            std::string kind = r_.str(*rt, "kind", path).value_or("web");
            if (!r_.one_of(kind, *rt, "kind", path, {"web", "server", "access", "exchange"})) continue;
            if (kind == "exchange") {
                r_.only_keys(*rt, path, {"name", "kind", "enabled", "description", "listeners",
                                         "from", "public_names", "domain", "users", "groups",
                                         "target", "services", "delegation"});
                expand_exchange(*rt, path, std::move(ru), c);
                continue;
            }
            ru.kind = kind == "web" ? rule_kind::web : kind == "server" ? rule_kind::server : rule_kind::access;
            if (ru.kind == rule_kind::web)
                r_.only_keys(*rt, path, {"name", "kind", "enabled", "action", "test", "description",
                                         "listeners", "from", "public_names", "paths", "methods",
                                         "users", "groups", "max_body", "target", "delegation"});
            else if (ru.kind == rule_kind::server)
                r_.only_keys(*rt, path, {"name", "kind", "enabled", "action", "test", "description",
                                         "listeners", "from", "users", "groups", "accepted_domains",
                                         "relay_from", "relay_authenticated", "max_body", "target"});
            else
                r_.only_keys(*rt, path, {"name", "kind", "enabled", "action", "description",
                                         "listeners", "from", "users", "groups"});
            r_.str(*rt, "description", path);
            if (auto b = r_.boolean(*rt, "enabled", path)) ru.enabled = *b;
            if (auto b = r_.boolean(*rt, "test", path)) ru.test = *b;
            bool act_known = false;  // a missing or misspelt action is reported once, not again by the target
            if (auto act = r_.str(*rt, "action", path, true))
                if (r_.one_of(*act, *rt, "action", path, {"allow", "deny"})) {
                    ru.act = *act == "allow" ? action::allow : action::deny;
                    act_known = true;
                }
            load_conditions(*rt, path, ru, c);
            if (ru.kind == rule_kind::web) load_delegation(*rt, path, ru);
            if (auto x = r_.size(*rt, "max_body", path)) ru.max_body = *x;
            if (ru.kind == rule_kind::server) {
                for (auto& d : r_.strings(*rt, "accepted_domains", path)) {
                    ru.accepted_domains.push_back(to_lower(d));
                    if (!valid_hostname(ru.accepted_domains.back()))
                        r_.error("CFG004", r_.at_key(*rt, "accepted_domains"), path + ".accepted_domains",
                                 "'" + d + "' is not a domain");
                }
                ru.relay_from_where = r_.at_key(*rt, "relay_from");
                for (auto& [n, where] : r_.located_strings(*rt, "relay_from", path)) {
                    check_source(c, n, where, path + ".relay_from");
                    ru.relay_from.push_back(n);
                }
                if (auto b = r_.boolean(*rt, "relay_authenticated", path)) ru.relay_authenticated = *b;
            }
            if (ru.kind == rule_kind::access && ru.act == action::allow)
                r_.error("CFG004", r_.at_key(*rt, "action"), path + ".action",
                         "access rules only deny: they filter sources before publishing rules",
                         "use a web or server rule to allow and publish");
            if (auto* tt = r_.table(*rt, "target", path)) {
                if (ru.act == action::deny && act_known)
                    r_.error("CFG004", r_.at_key(*rt, "target"), path + ".target",
                             "a deny rule has no target");
                else if (ru.act == action::deny)
                    (void)load_target(*tt, path + ".target", ru.kind);  // its own mistakes still count
                else
                    ru.to = load_target(*tt, path + ".target", ru.kind);
            } else if (ru.act == action::allow && ru.kind != rule_kind::access && name) {
                r_.error("CFG008", ru.where, path + ".target",
                         "allow rule '" + ru.name + "' needs a target",
                         "add [rules.target] with the upstream's address and port");
            }
            add_rule(std::move(ru), r_.at_key(*rt, "name"), path, c);
        }
    }

    void add_rule(rule ru, const source_location& name_where, const std::string& path,
                  instance_config& c) {
        if (ru.name.empty()) return;
        for (auto& other : c.rules)
            if (other.name == ru.name) {
                r_.error("CFG005", name_where, path + ".name",
                         "duplicate rule name '" + ru.name + "': already defined at " + other.where.to_string());
                return;
            }
        c.rules.push_back(std::move(ru));
    }

    void expand_exchange(const toml::table& rt, const std::string& path, rule base,
                         instance_config& c) {
        r_.str(rt, "description", path);
        base.act = action::allow;
        base.exchange_guards = true;
        base.template_rule = base.name;
        if (auto b = r_.boolean(rt, "enabled", path)) base.enabled = *b;
        load_conditions(rt, path, base, c);
        load_delegation(rt, path, base);
        auto domain = to_lower(r_.str(rt, "domain", path, true).value_or(""));
        if (!domain.empty() && !valid_hostname(domain))
            r_.error("CFG004", r_.at_key(rt, "domain"), path + ".domain", "'" + domain + "' is not a domain");
        if (base.public_names.empty() && !domain.empty()) base.public_names.push_back("mail." + domain);
        target web_target;
        if (auto* tt = r_.table(rt, "target", path, true)) {
            web_target = load_target(*tt, path + ".target", rule_kind::web, true);
            if (web_target.tls && web_target.name.empty() && !base.public_names.empty())
                web_target.name = base.public_names.front();
            if (web_target.tls && web_target.name.empty() && web_target.host.empty() && web_target.instance.empty())
                r_.error("CFG008", web_target.where, path + ".target.name",
                         "an https target needs 'name': the name to verify on its certificate");
        }
        if (web_target.port == 0) web_target.port = 443;

        std::vector<std::string> web_listeners, smtp_listeners;
        for (auto& ln : base.listeners) {
            auto* l = c.find_listener(ln);
            if (!l) {
                web_listeners.push_back(ln);  // reported as dangling later
                continue;
            }
            (l->proto == protocol::smtp ? smtp_listeners : web_listeners).push_back(ln);
        }
        const toml::table* services = r_.table(rt, "services", path);
        std::vector<std::string> keys;
        for (auto& s : exchange_services()) keys.push_back(s.key);
        keys.push_back("smtp");
        if (services) {
            for (auto&& [k, v] : *services) {
                if (std::find(keys.begin(), keys.end(), k.str()) == keys.end()) {
                    auto guess = did_you_mean(std::string(k.str()), keys);
                    r_.error("CFG002", r_.at(k), path + ".services." + std::string(k.str()),
                             "unknown Exchange service '" + std::string(k.str()) + "'",
                             guess.empty() ? "" : "did you mean '" + guess + "'?");
                }
            }
        }
        auto service_table = [&](const char* key, bool def, bool& enabled) -> const toml::table* {
            enabled = def;
            if (!services) return nullptr;
            auto* n = services->get(key);
            if (!n) return nullptr;
            auto sp = path + ".services." + key;
            if (auto* b = n->as_boolean()) {
                enabled = b->get();
                return nullptr;
            }
            if (auto* t = n->as_table()) {
                enabled = r_.boolean(*t, "enabled", sp).value_or(true);
                return t;
            }
            r_.error("CFG003", r_.at(*n), sp, "'" + sp + "' must be true, false or a table");
            return nullptr;
        };
        for (auto& svc : exchange_services()) {
            bool enabled = false;
            auto* st = service_table(svc.key, svc.enabled_by_default, enabled);
            auto sp = path + ".services." + svc.key;
            rule ru = base;
            ru.name = base.name + "/" + svc.key;
            ru.service = svc.key;
            ru.kind = rule_kind::web;
            ru.listeners = web_listeners;
            ru.paths = svc.paths;
            ru.methods = svc.methods;
            ru.max_body = svc.max_body;
            ru.to = web_target;
            ru.to->timeouts.read = svc.read_timeout;
            if (std::string_view(svc.key) == "autodiscover" && !domain.empty())
                ru.public_names.push_back("autodiscover." + domain);
            if (st) {
                ru.where = r_.at(*st);
                r_.only_keys(*st, sp, {"enabled", "paths", "methods", "max_body", "timeouts", "public_names"});
                if (st->get("paths")) {
                    ru.paths.clear();
                    for (auto& p : r_.strings(*st, "paths", sp)) add_path(p, r_.at_key(*st, "paths"), sp + ".paths", ru);
                }
                if (st->get("methods")) ru.methods = r_.strings(*st, "methods", sp);
                for (auto& n : r_.strings(*st, "public_names", sp)) ru.public_names.push_back(to_lower(n));
                if (auto x = r_.size(*st, "max_body", sp)) ru.max_body = *x;
                if (auto* tt = r_.table(*st, "timeouts", sp)) {
                    auto tp = sp + ".timeouts";
                    r_.only_keys(*tt, tp, {"connect", "read", "idle"});
                    if (auto x = r_.duration(*tt, "connect", tp)) ru.to->timeouts.connect = *x;
                    if (auto x = r_.duration(*tt, "read", tp)) ru.to->timeouts.read = *x;
                    if (auto x = r_.duration(*tt, "idle", tp)) ru.to->timeouts.idle = *x;
                }
            }
            if (!enabled) continue;
            if (web_listeners.empty()) {
                r_.error("CFG006", base.where, path + ".listeners",
                         "Exchange rule '" + base.name + "' publishes web services but lists no http or https listener");
                break;
            }
            add_rule(std::move(ru), base.where, sp, c);
        }
        bool smtp_enabled = false;
        auto* st = service_table("smtp", !smtp_listeners.empty(), smtp_enabled);
        if (!smtp_enabled) return;
        auto sp = path + ".services.smtp";
        rule ru = base;
        ru.name = base.name + "/smtp";
        ru.service = "smtp";
        ru.kind = rule_kind::server;
        ru.exchange_guards = false;
        ru.listeners = smtp_listeners;
        ru.public_names.clear();
        ru.paths.clear();
        ru.methods.clear();
        // The Internet's mail arrives anonymously: the stanza's users and groups are for its
        // web services. SMTP AUTH matters only for relaying (relay_authenticated).
        ru.users.clear();
        ru.groups.clear();
        ru.delegate.reset();
        ru.accepted_domains = {domain};
        ru.to = web_target;
        ru.to->tls = false;
        ru.to->port = 25;
        ru.to->name.clear();
        ru.to->timeouts = rule_timeouts{};
        ru.to->timeouts.read = 600s;  // RFC 5321: the end-of-data reply may take 10 minutes
        ru.to->mode = server_mode::smtp;
        if (st) {
            ru.where = r_.at(*st);
            r_.only_keys(*st, sp, {"enabled", "accepted_domains", "relay_from", "relay_authenticated", "port", "mode", "max_body"});
            if (st->get("accepted_domains")) {
                ru.accepted_domains.clear();
                for (auto& d : r_.strings(*st, "accepted_domains", sp)) ru.accepted_domains.push_back(to_lower(d));
            }
            ru.relay_from_where = r_.at_key(*st, "relay_from");
            for (auto& [n, where] : r_.located_strings(*st, "relay_from", sp)) {
                check_source(c, n, where, sp + ".relay_from");
                ru.relay_from.push_back(n);
            }
            if (auto b = r_.boolean(*st, "relay_authenticated", sp)) ru.relay_authenticated = *b;
            if (auto p = r_.integer(*st, "port", sp, 1, 65535)) ru.to->port = static_cast<std::uint16_t>(*p);
            if (auto m = r_.str(*st, "mode", sp))
                if (r_.one_of(*m, *st, "mode", sp, {"smtp", "tcp"}))
                    ru.to->mode = *m == "smtp" ? server_mode::smtp : server_mode::tcp;
            if (auto x = r_.size(*st, "max_body", sp)) ru.max_body = *x;
        }
        if (smtp_listeners.empty()) {
            r_.error("CFG006", base.where, path + ".listeners",
                     "Exchange rule '" + base.name + "' publishes SMTP but lists no smtp listener");
            return;
        }
        add_rule(std::move(ru), base.where, sp, c);
    }

    std::vector<std::string> source_names(const instance_config& c) {
        std::vector<std::string> out{external_network};
        for (auto& n : c.networks) out.push_back(n.name);
        for (auto& s : c.address_sets) out.push_back(s.name);
        return out;
    }

    bool known_source(const instance_config& c, const std::string& n) {
        return n == external_network || c.find_network(n) || c.find_address_set(n);
    }

    void check_references(const instance_config& c) {
        for (auto& [n, where] : trust_from_)
            check_source(c, n, where, "instance.trust_forwarded_from");
    }

    toml_reader r_;
    std::string base_dir_;
    const load_options& opts_;
    diagnostics& out_;
    std::vector<std::pair<std::string, source_location>> trust_from_;
};

}  // namespace

load_result load_instance_config_table(const toml::table& t, const std::string& file,
                                       const std::string& base_dir, const load_options& opts) {
    load_result res;
    res.parsed = true;
    loader l(file, base_dir, opts, res.diags);
    res.config = l.load(t);
    return res;
}

load_result load_instance_config_text(const std::string& text, const std::string& file,
                                      const load_options& opts) {
    load_result res;
    auto t = parse_toml(text, file, res.diags);
    if (!t) return res;
    auto base = fs::path(file).parent_path().string();
    auto inner = load_instance_config_table(*t, file, base.empty() ? "." : base, opts);
    inner.diags.insert(inner.diags.begin(), res.diags.begin(), res.diags.end());
    return inner;
}

load_result load_instance_config(const std::string& path, const load_options& opts) {
    load_result res;
    auto t = parse_toml_file(path, res.diags);
    if (!t) return res;
    if (t->empty()) {
        res.diags.push_back({severity::error, "CFG009", {path, 1, 1}, "",
                             "'" + path + "' is empty: an instance config needs an [instance] table and at least one listener",
                             "start from /usr/share/doc/dmzproxy/examples/front-end.toml or the README's example"});
        return res;  // not parsed: nothing to run
    }
    auto base = fs::path(path).parent_path().string();
    return load_instance_config_table(*t, path, base.empty() ? "." : base, opts);
}

}  // namespace dmz::rules
