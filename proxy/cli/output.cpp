#include "output.hpp"

#include <algorithm>
#include <iomanip>
#include <ostream>

namespace dmz::cli {

using nlohmann::json;

namespace {
std::string join(const std::vector<std::string>& v, const char* empty = "any") {
    if (v.empty()) return empty;
    std::string out;
    for (std::size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + v[i];
    return out;
}

std::string human_size(std::uint64_t b) {
    if (b == 0) return "-";
    if (b % (1024ULL * 1024 * 1024) == 0) return std::to_string(b / (1024ULL * 1024 * 1024)) + " GiB";
    if (b % (1024 * 1024) == 0) return std::to_string(b / (1024 * 1024)) + " MiB";
    if (b % 1024 == 0) return std::to_string(b / 1024) + " KiB";
    return std::to_string(b) + " B";
}

std::string seconds(rules::millis m) {
    if (m.count() % 1000 == 0) return std::to_string(m.count() / 1000) + "s";
    return std::to_string(m.count()) + "ms";
}
}  // namespace

void print_diagnostics(std::ostream& os, const rules::diagnostics& d) {
    for (auto& x : d) {
        os << x.where.to_string() << ": " << rules::to_string(x.level) << " " << x.code << ": " << x.message;
        if (!x.key.empty()) os << " [" << x.key << "]";
        os << "\n";
        if (!x.hint.empty()) os << "    hint: " << x.hint << "\n";
    }
}

json diagnostics_json(const rules::diagnostics& d) {
    json arr = json::array();
    for (auto& x : d)
        arr.push_back({{"severity", rules::to_string(x.level)},
                       {"code", x.code},
                       {"message", x.message},
                       {"hint", x.hint},
                       {"key", x.key},
                       {"file", x.where.file},
                       {"line", x.where.line},
                       {"column", x.where.column}});
    return arr;
}

void print_rules(std::ostream& os, const rules::instance_config& c) {
    os << "instance " << c.name << (c.role.empty() ? "" : " (" + c.role + ")") << "  [" << c.file << "]\n";
    for (auto& l : c.listeners) {
        os << "  listener " << l.name << ": " << rules::to_string(l.proto);
        for (auto& b : l.bind) os << " " << b.to_string();
        os << ", authentication " << rules::to_string(l.auth);
        if (l.redirect_to_https) os << ", redirects to https";
        os << "\n";
    }
    if (!c.trust_forwarded_from.empty()) os << "  trusts forwarded client addresses from: " << join(c.trust_forwarded_from) << "\n";
    int i = 0;
    for (auto& r : c.rules) {
        ++i;
        os << "  " << std::setw(2) << i << ". " << r.name << "  [" << rules::to_string(r.kind) << ", "
           << rules::to_string(r.act) << (r.enabled ? "" : ", disabled") << (r.test ? ", test rule" : "") << "]  "
           << r.where.to_string() << "\n";
        os << "      listeners " << join(r.listeners) << "; from " << join(r.from);
        if (r.kind == rules::rule_kind::web)
            os << "; names " << join(r.public_names) << "; paths " << join(r.paths) << "; methods " << join(r.methods);
        if (!r.users.empty() || !r.groups.empty()) os << "; users " << join(r.users, "-") << "; groups " << join(r.groups, "-");
        os << "\n";
        if (r.kind == rules::rule_kind::server)
            os << "      accepted domains " << join(r.accepted_domains, "none") << "; anonymous relay from "
               << join(r.relay_from, "nobody") << "; authenticated relay " << (r.relay_authenticated ? "yes" : "no") << "\n";
        if (r.to) {
            os << "      -> " << r.to->describe();
            if (r.kind == rules::rule_kind::server) os << ", mode " << (r.to->mode == rules::server_mode::smtp ? "smtp" : "tcp");
            else os << ", Host " << (r.to->host_policy == rules::host_header::original ? "original" : "target name");
            os << ", client address " << (r.to->client_policy == rules::client_address::forwarded ? "forwarded" : "hidden");
            os << "; body limit " << human_size(r.max_body) << "; timeouts connect " << seconds(r.to->timeouts.connect)
               << " read " << seconds(r.to->timeouts.read) << " idle " << seconds(r.to->timeouts.idle) << "\n";
        }
    }
    os << "  " << std::setw(2) << i + 1 << ". default deny  [built in]\n";
}

json rules_json(const rules::instance_config& c) {
    json rules = json::array();
    for (auto& r : c.rules) {
        json j = {{"name", r.name},
                  {"kind", rules::to_string(r.kind)},
                  {"action", rules::to_string(r.act)},
                  {"enabled", r.enabled},
                  {"test", r.test},
                  {"listeners", r.listeners},
                  {"from", r.from},
                  {"public_names", r.public_names},
                  {"paths", r.paths},
                  {"methods", r.methods},
                  {"users", r.users},
                  {"groups", r.groups},
                  {"max_body", r.max_body},
                  {"file", r.where.file},
                  {"line", r.where.line},
                  {"column", r.where.column}};
        if (!r.template_rule.empty()) j["template"] = r.template_rule, j["service"] = r.service;
        if (r.kind == rules::rule_kind::server)
            j["accepted_domains"] = r.accepted_domains, j["relay_from"] = r.relay_from,
            j["relay_authenticated"] = r.relay_authenticated;
        if (r.to) {
            j["target"] = {{"instance", r.to->instance},
                           {"host", r.to->host},
                           {"address", r.to->address ? r.to->address->to_string() : ""},
                           {"port", r.to->port},
                           {"tls", r.to->tls},
                           {"name", r.to->name},
                           {"host_header", r.to->host_policy == rules::host_header::original ? "original" : "target"},
                           {"client_address", r.to->client_policy == rules::client_address::forwarded ? "forwarded" : "proxy"},
                           {"timeouts", {{"connect_ms", r.to->timeouts.connect.count()},
                                         {"read_ms", r.to->timeouts.read.count()},
                                         {"idle_ms", r.to->timeouts.idle.count()}}}};
            if (r.kind == rules::rule_kind::server) j["target"]["mode"] = r.to->mode == rules::server_mode::smtp ? "smtp" : "tcp";
        }
        rules.push_back(std::move(j));
    }
    json listeners = json::array();
    for (auto& l : c.listeners) {
        json binds = json::array();
        for (auto& b : l.bind) binds.push_back(b.to_string());
        listeners.push_back({{"name", l.name}, {"protocol", rules::to_string(l.proto)}, {"bind", binds},
                             {"authentication", rules::to_string(l.auth)}});
    }
    return {{"name", c.name}, {"role", c.role}, {"file", c.file}, {"listeners", listeners}, {"rules", rules}};
}

namespace {
const char* verdict_line(topology::outcome o) {
    switch (o) {
    case topology::outcome::ok: return "OK";
    case topology::outcome::rule_fault: return "RULE FAULT";
    case topology::outcome::network_fault: return "NETWORK FAULT";
    case topology::outcome::auth_fault: return "AUTH FAULT";
    }
    return "?";
}
}  // namespace

topology::probe make_probe(const std::string& command_name, const std::string& what, const std::string& from,
                           const std::string& method, const std::string& mail_from, std::string rcpt) {
    topology::probe p;
    auto a = rules::ip_address::parse(from);
    if (!a) throw std::invalid_argument("--from '" + from + "' is not an IP address");
    p.from = *a;
    p.method = method;
    if (what == "smtp" || what.rfind("smtp:", 0) == 0) {
        p.smtp = true;
        // smtp:demo@contoso.com names the recipient; smtp:mail.contoso.com[:25] the server.
        auto arg = what.size() > 5 ? what.substr(5) : std::string();
        if (arg.find('@') != std::string::npos) {
            if (rcpt.empty()) rcpt = arg;
        } else {
            p.smtp_server = arg;
        }
        if (rcpt.empty()) throw std::invalid_argument(command_name + " smtp needs a recipient: smtp:ADDRESS or --rcpt ADDRESS");
        p.mail_from = mail_from;
        p.rcpt = rcpt;
    } else {
        p.url = what;
    }
    return p;
}

void print_explanation(std::ostream& os, const topology::probe& p, const topology::topology& t,
                       const topology::explanation& ex) {
    if (p.smtp)
        os << "explain: SMTP to " << (p.smtp_server.empty() ? t.mx : p.smtp_server) << " MAIL FROM:<" << p.mail_from
           << "> RCPT TO:<" << p.rcpt << ">";
    else
        os << "explain: " << p.method << " " << p.url;
    os << " from " << p.from.to_string() << " (network " << t.network_of(p.from) << ")"
       << (p.user.empty() ? ", anonymous" : ", user " + p.user) << (p.with_test_rules ? ", test rules enabled" : "") << "\n";
    if (!ex.redirect.empty()) os << "  first: " << ex.redirect << "\n";
    int n = 0;
    for (auto& tr : ex.tiers) {
        os << "\n[" << ++n << "] " << tr.instance << (tr.role.empty() ? "" : " (" + tr.role + ")") << ": listener "
           << tr.listener << " on " << tr.address << "\n";
        os << "    sees connection from " << tr.transport_source << "; judges client " << tr.client << " ("
           << tr.client_note << ")\n";
        if (!tr.host.empty())
            os << "    Host " << tr.host << (tr.sni.empty() ? "" : "; SNI " + tr.sni) << "; path "
               << (tr.decision.path.safe() ? tr.decision.path.path : "refused: " + tr.decision.path.unsafe) << "\n";
        for (auto& e : tr.decision.trace) {
            os << "    " << std::left << std::setw(28) << e.rule << std::setw(15) << rules::to_string(e.result);
            if (!e.condition.empty() && e.result != rules::examined_rule::outcome::matched) os << e.condition << ": ";
            os << e.reason << "\n";
        }
        if (!tr.decision.matched && tr.decision.why == rules::fault_class::no_rule_matched)
            os << "    " << std::left << std::setw(28) << "default deny" << std::setw(15) << "match" << "no earlier rule matched\n";
        os << "    => " << (tr.action == "allow" ? "ALLOW" : "DENY") << " by " << tr.matched_rule
           << (tr.decision.matched && !tr.decision.where.file.empty() ? " (" + tr.decision.where.to_string() + ")" : "") << ": "
           << tr.decision.reason << "\n";
        if (!tr.target.empty()) os << "    -> forwards to " << tr.target << "\n";
    }
    os << "\n" << verdict_line(ex.result);
    if (ex.result == topology::outcome::ok)
        os << ": " << ex.reason << "\n" << "  " << ex.arrival << "\n";
    else
        os << " at " << ex.stopped_at << ": " << ex.reason << "\n";
    if (ex.with_test_rules) {
        if (*ex.with_test_rules == topology::outcome::ok)
            os << "  With each tier's test rule enabled it reaches '" << ex.with_test_rules_reached
               << "': the path works, a rule stops it (a rule fault, not a network fault).\n";
        else
            os << "  With each tier's test rule enabled it still fails (" << topology::to_string(*ex.with_test_rules) << ": "
               << ex.with_test_rules_reason << ").\n";
    }
}

json explanation_json(const topology::probe& p, const topology::explanation& ex) {
    json tiers = json::array();
    for (auto& tr : ex.tiers) {
        json examined = json::array();
        for (auto& e : tr.decision.trace)
            examined.push_back({{"rule", e.rule},
                                {"result", rules::to_string(e.result)},
                                {"condition", e.condition},
                                {"reason", e.reason},
                                {"file", e.where.file},
                                {"line", e.where.line}});
        json j = {{"instance", tr.instance},
                  {"role", tr.role},
                  {"address", tr.address},
                  {"listener", tr.listener},
                  {"transport_source", tr.transport_source},
                  {"client", tr.client},
                  {"client_note", tr.client_note},
                  {"matched_rule", tr.matched_rule},
                  {"action", tr.action},
                  {"fault", rules::to_string(tr.decision.why)},
                  {"reason", tr.decision.reason},
                  {"examined", examined},
                  {"target", tr.target.empty() ? json(nullptr) : json(tr.target)}};
        if (tr.decision.where.line) j["rule_location"] = tr.decision.where.to_string();
        if (!tr.host.empty()) {
            j["host"] = tr.host;
            j["sni"] = tr.sni;
            j["path"] = tr.decision.path.safe() ? tr.decision.path.path : "";
            if (!tr.decision.path.safe()) j["path_refused"] = tr.decision.path.unsafe;
        }
        if (!tr.decision.smtp_disposition.empty()) j["smtp"] = tr.decision.smtp_disposition;
        tiers.push_back(std::move(j));
    }
    json out = {{"verdict", ex.allowed() ? "allow" : "deny"},
                {"outcome", topology::to_string(ex.result)},
                {"reached", ex.reached.empty() ? json(nullptr) : json(ex.reached)},
                {"stopped_at", ex.stopped_at.empty() ? json(nullptr) : json(ex.stopped_at)},
                {"reason", ex.reason},
                {"from", p.from.to_string()},
                {"tiers", tiers}};
    if (!ex.redirect.empty()) out["redirect"] = ex.redirect;
    if (!ex.arrival.empty()) out["arrival"] = ex.arrival;
    if (ex.with_test_rules)
        out["with_test_rules"] = {{"outcome", topology::to_string(*ex.with_test_rules)},
                                  {"reached", ex.with_test_rules_reached.empty() ? json(nullptr) : json(ex.with_test_rules_reached)},
                                  {"reason", ex.with_test_rules_reason}};
    return out;
}

}  // namespace dmz::cli
