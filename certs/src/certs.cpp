#include "dmz/certs/certs.hpp"

#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <cstdio>
#include <memory>

namespace dmz::certs {

namespace {
std::string lower(std::string s) {
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    return s;
}

bool name_matches(const std::string& pattern, const std::string& host) {
    if (pattern.rfind("*.", 0) == 0) {
        auto suffix = pattern.substr(1);
        if (host.size() <= suffix.size() || host.compare(host.size() - suffix.size(), suffix.size(), suffix) != 0)
            return false;
        return host.substr(0, host.size() - suffix.size()).find('.') == std::string::npos;
    }
    return pattern == host;
}
}  // namespace

std::optional<certificate_info> read_certificate(const std::string& pem_path, std::string* error) {
    std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(pem_path.c_str(), "rb"), &std::fclose);
    if (!f) {
        if (error) *error = "cannot open '" + pem_path + "'";
        return std::nullopt;
    }
    std::unique_ptr<X509, void (*)(X509*)> cert(PEM_read_X509(f.get(), nullptr, nullptr, nullptr), &X509_free);
    if (!cert) {
        if (error) *error = "'" + pem_path + "' holds no PEM certificate";
        return std::nullopt;
    }
    certificate_info info;
    char buf[512] = {};
    X509_NAME_oneline(X509_get_subject_name(cert.get()), buf, sizeof buf);
    info.subject = buf;
    int len = X509_NAME_get_text_by_NID(X509_get_subject_name(cert.get()), NID_commonName, buf, sizeof buf);
    if (len > 0) info.common_name = lower(std::string(buf, static_cast<std::size_t>(len)));
    auto* sans = static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert.get(), NID_subject_alt_name, nullptr, nullptr));
    if (sans) {
        for (int i = 0; i < sk_GENERAL_NAME_num(sans); ++i) {
            const GENERAL_NAME* gn = sk_GENERAL_NAME_value(sans, i);
            if (gn->type != GEN_DNS) continue;
            const unsigned char* data = ASN1_STRING_get0_data(gn->d.dNSName);
            int n = ASN1_STRING_length(gn->d.dNSName);
            info.dns_names.push_back(lower(std::string(reinterpret_cast<const char*>(data), static_cast<std::size_t>(n))));
        }
        GENERAL_NAMES_free(sans);
    }
    return info;
}

bool certificate_covers(const certificate_info& cert, const std::string& host) {
    auto h = lower(host);
    if (!cert.dns_names.empty())
        return std::any_of(cert.dns_names.begin(), cert.dns_names.end(), [&](auto& n) { return name_matches(n, h); });
    return !cert.common_name.empty() && name_matches(cert.common_name, h);
}

}  // namespace dmz::certs
