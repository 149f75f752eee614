#include "dmz/certs/lint.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <ctime>
#include <set>

#include "dmz/certs/certs.hpp"
#include "dmz/rules/evaluate.hpp"

namespace dmz::certs {

namespace {

using rules::severity;
using rules::source_location;

constexpr std::time_t soon = 30 * 24 * 3600;

std::string date(std::time_t t) {
    char buf[32] = "?";
    struct tm tm {};
    if (gmtime_r(&t, &tm)) std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M UTC", &tm);
    return buf;
}

/// One certificate entry of a listener, and where its findings go.
struct entry_check {
    const rules::certificate& cert;
    std::string key;  ///< "listeners.web.certificates[0]"
    rules::diagnostics& out;

    void add(severity s, const char* code, const source_location& where, const std::string& sub, std::string msg,
             std::string hint = {}) const {
        out.push_back({s, code, where, key + "." + sub, std::move(msg), std::move(hint)});
    }

    const source_location& where_of(file_role r) const {
        return r == file_role::key ? cert.key_where : r == file_role::password ? cert.password_where : cert.cert_where;
    }
    static const char* name_of(file_role r) {
        return r == file_role::key ? "key" : r == file_role::password ? "password_file" : "cert";
    }

    void load_failed(const load_error& e) const {
        const char* code = e.problem == load_problem::bad_password ? "CERT002" : e.problem == load_problem::key_mismatch ? "CERT003" : "CERT001";
        add(severity::error, code, where_of(e.role), name_of(e.role), e.message, e.hint);
    }

    void password_file_mode() const {
        struct stat st {};
        if (cert.password_file.empty() || ::stat(cert.password_file.c_str(), &st) != 0) return;
        if ((st.st_mode & 077) == 0) return;
        char mode[8];
        std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
        add(severity::warning, "CERT009", cert.password_where, "password_file",
            "password file '" + cert.password_file + "' is open to group or others (mode " + mode + ")",
            "chmod 600 '" + cert.password_file + "', owned by the account dmzproxy runs as");
    }

    void validity(x509_st* x, bool leaf, std::time_t now) const {
        auto info = describe(x);
        std::string what = leaf ? "certificate '" + info.subject + "'" : "intermediate '" + info.subject + "'";
        if (info.not_after < now)
            add(severity::error, "CERT004", cert.cert_where, "cert", what + " in '" + cert.cert_file + "' expired on " + date(info.not_after),
                "renew it (Exchange: New-ExchangeCertificate or the CA's renewal), export again and replace the file");
        else if (info.not_before > now)
            add(severity::error, "CERT004", cert.cert_where, "cert",
                what + " in '" + cert.cert_file + "' is not valid before " + date(info.not_before),
                "check this machine's clock, or wait: clients refuse it until then");
        else if (leaf && info.not_after < now + soon)
            add(severity::warning, "CERT005", cert.cert_where, "cert",
                what + " in '" + cert.cert_file + "' expires on " + date(info.not_after) + ", in " +
                    std::to_string((info.not_after - now) / 86400) + " days",
                "renew it now and reload: an expired certificate stops every client");
    }

    void chain(const key_pair& p) const {
        auto info = describe(p.leaf.get());
        if (info.self_signed || issuer_known(p.leaf.get(), p.chain)) return;
        add(severity::warning, "CERT006", cert.cert_where, "cert",
            "the issuer of '" + info.subject + "' (" + info.issuer + ") is not in '" + cert.cert_file +
                "' nor trusted by this system: clients that lack it (phones, curl, Java) refuse the chain",
            "append the intermediate CA certificate(s) after the leaf (PEM), or export the PFX with "
            "'Include all certificates in the certification path'");
    }

    void names(const certificate_info& info) const {
        for (auto& n : cert.names)
            if (!certificate_covers(info, n))
                add(severity::error, "CERT007", cert.names_where, "names",
                    "'" + n + "' is not on the certificate in '" + cert.cert_file + "' (it carries " +
                        (info.dns_names.empty() ? info.common_name : [&] {
                            std::string s;
                            for (auto& d : info.dns_names) s += (s.empty() ? "" : ", ") + d;
                            return s;
                        }()) +
                        "): clients asking for it get a name mismatch",
                    "remove the name from 'names', or give a certificate whose subjectAltName carries it");
    }
};

/// What a listener's certificates carry: loaded names, or a lab entry's own names (the lab
/// issues exactly those). `complete` is false when one did not load: no guesses then.
struct listener_names {
    std::vector<certificate_info> loaded;
    std::vector<std::string> lab;
    bool complete = true;

    bool covers(const std::string& name) const {
        for (auto& i : loaded)
            if (certificate_covers(i, name)) return true;
        return std::any_of(lab.begin(), lab.end(), [&](auto& n) { return rules::host_matches(n, name); });
    }
};

listener_names check_listener(const rules::listener& l, rules::diagnostics& out, std::time_t now) {
    listener_names have;
    for (std::size_t i = 0; i < l.certificates.size(); ++i) {
        auto& cert = l.certificates[i];
        if (cert.lab) {
            have.lab.insert(have.lab.end(), cert.names.begin(), cert.names.end());
            continue;
        }
        if (cert.cert_file.empty()) {
            have.complete = false;
            continue;
        }
        entry_check e{cert, "listeners." + l.name + ".certificates[" + std::to_string(i) + "]", out};
        e.password_file_mode();
        auto r = load_key_pair({cert.cert_file, cert.key_file, cert.password_file});
        if (!r.pair) {
            e.load_failed(*r.error);
            have.complete = false;
            continue;
        }
        e.validity(r.pair->leaf.get(), true, now);
        for (auto& c : r.pair->chain) e.validity(c.get(), false, now);
        e.chain(*r.pair);
        auto info = describe(r.pair->leaf.get());
        e.names(info);
        have.loaded.push_back(std::move(info));
    }
    return have;
}

bool rule_on(const rules::rule& r, const rules::listener& l) {
    if (r.kind != rules::rule_kind::web || !r.enabled || r.act != rules::action::allow) return false;
    return r.listeners.empty() || std::find(r.listeners.begin(), r.listeners.end(), l.name) != r.listeners.end();
}

}  // namespace

void lint(const rules::instance_config& c, rules::diagnostics& out, std::time_t now) {
    for (auto& l : c.listeners) {
        if (l.certificates.empty()) continue;  // SMTP listeners' STARTTLS certificates load here too
        auto have = check_listener(l, out, now);
        if (l.proto != rules::protocol::https || !have.complete) continue;
        std::set<std::string> told;  // the Exchange stanza's services share their names: once each
        for (auto& r : c.rules) {
            if (!rule_on(r, l)) continue;
            for (auto& n : r.public_names)
                if (!have.covers(n) && told.insert(n).second)
                    out.push_back({severity::warning, "CERT008", r.where, "rules." + r.name + ".public_names",
                                   "rule '" + r.name + "' publishes '" + n + "' on https listener '" + l.name +
                                       "', but none of its certificates carries that name",
                                   "add the name to a certificate (subjectAltName) and to its 'names', or publish it on "
                                   "a listener that has one"});
        }
    }
}

void lint(const rules::instance_config& c, rules::diagnostics& out) { lint(c, out, std::time(nullptr)); }

}  // namespace dmz::certs
