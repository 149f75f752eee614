#pragma once
/// @file Lab PKI and certificate inspection (OpenSSL). Nothing here touches sockets.
#include <optional>
#include <string>
#include <vector>

namespace dmz::certs {

struct certificate_info {
    std::string subject;
    std::vector<std::string> dns_names;  ///< subjectAltName DNS entries, lower case
    std::string common_name;
};

/// Reads the first certificate of a PEM file. On failure returns nullopt and sets *error.
std::optional<certificate_info> read_certificate(const std::string& pem_path, std::string* error);

/// RFC 6125 matching of a host name against a certificate's names: subjectAltName DNS
/// entries only when there are any (then the CN is ignored), a wildcard covers one label.
bool certificate_covers(const certificate_info& cert, const std::string& host);

}  // namespace dmz::certs
