// dmzproxy certs init | issue NAME... | show FILE   (lab PKI)
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
};
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
    auto* show = sub->add_subcommand("show", "Print a certificate's subject and names");
    show->add_option("file", o->file, "PEM certificate")->required();
    return [o, init, issue, show]() -> int {
        auto pki = o->state + "/pki";
        if (show->parsed()) {
            std::string err;
            auto info = certs::read_certificate(o->file, &err);
            if (!info) {
                std::cerr << "dmzproxy certs show: " << err << "\n";
                return 1;
            }
            std::cout << "subject " << info->subject << "\n";
            for (auto& n : info->dns_names) std::cout << "name " << n << "\n";
            return 0;
        }
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
