// dmzproxy certs init | issue NAME... | show FILE   (lab PKI)
#include <ctime>
#include <iostream>
#include <memory>

#include "commands.hpp"
#include "dmz/certs/certs.hpp"

namespace dmz::cli {

namespace {
struct certs_cli {
    std::string state = "lab-state";
    std::vector<std::string> names;
    std::string out;
    std::string file;
    std::string password_file;
};

std::string utc(std::time_t t) {
    char buf[32] = "?";
    struct tm tm {};
    if (gmtime_r(&t, &tm)) std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S UTC", &tm);
    return buf;
}

/// certs show: a PEM chain or a PFX, leaf first, then each intermediate.
int show_file(const certs_cli& o) {
    auto loaded = certs::load_key_pair({o.file, "", o.password_file}, false);
    if (!loaded.pair) {
        std::cerr << "dmzproxy certs show: " << loaded.error->message << "\n";
        if (!loaded.error->hint.empty()) std::cerr << "  hint: " << loaded.error->hint << "\n";
        return 1;
    }
    auto info = certs::describe(loaded.pair->leaf.get());
    std::cout << "subject " << info.subject << "\n";
    for (auto& n : info.dns_names) std::cout << "name " << n << "\n";
    std::cout << "issuer " << info.issuer << (info.self_signed ? " (self-signed)" : "") << "\n"
              << "valid " << utc(info.not_before) << " to " << utc(info.not_after) << "\n"
              << "sha256 " << info.sha256 << "\n"
              << "key " << (loaded.pair->key ? "yes, matches the certificate" : "not in this file") << "\n";
    for (auto& c : loaded.pair->chain) {
        auto ci = certs::describe(c.get());
        std::cout << "chain " << ci.subject << " (issuer " << ci.issuer << ", valid to " << utc(ci.not_after) << ")\n";
    }
    return 0;
}
}  // namespace

command add_certs(CLI::App& app) {
    auto o = std::make_shared<certs_cli>();
    auto* sub = app.add_subcommand("certs", "Lab PKI: a lab CA and leaf certificates with subjectAltNames (PEM)");
    sub->require_subcommand(1);
    sub->add_option("--state", o->state, "lab state folder (default: lab-state); certificates go to STATE/pki");
    auto* init = sub->add_subcommand("init", "Make the lab CA (or show the existing one)");
    auto* issue = sub->add_subcommand("issue", "Issue a leaf certificate for NAME... (DNS names or IP addresses)");
    issue->add_option("names", o->names, "names for the subjectAltName; the first is the subject")->required();
    issue->add_option("--out", o->out, "file stem in STATE/pki (default: the first name)");
    auto* show = sub->add_subcommand("show", "Print a certificate's subject, names, validity and chain (PEM or PFX)");
    show->add_option("file", o->file, "PEM certificate (chain) or PKCS#12 (.pfx, .p12)")->required();
    show->add_option("--password-file", o->password_file, "file whose first line is the PFX (or encrypted key's) password");
    return [o, init, issue, show]() -> int {
        auto pki = o->state + "/pki";
        if (show->parsed()) return show_file(*o);
        auto ca = certs::open_or_make_ca(pki);
        if (init->parsed()) {
            std::cout << "lab CA: " << ca.cert_file() << "\n(trust it in clients: curl --cacert " << ca.cert_file() << ")\n";
            return 0;
        }
        if (issue->parsed()) {
            auto stem = o->out.empty() ? o->names.front() : o->out;
            for (auto& c : stem)
                if (c == '*') c = '_';
            auto leaf = certs::issue_leaf(ca, o->names, pki, stem);
            std::cout << "certificate: " << leaf.cert_file << "\nkey:         " << leaf.key_file << "\nissuer:      " << ca.cert_file()
                      << "\n";
            return 0;
        }
        return 2;
    };
}

}  // namespace dmz::cli
