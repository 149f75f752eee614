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

/// A lab certificate authority on disk: `ca.pem` and `ca.key` in a folder.
struct lab_ca {
    std::string dir;
    std::string cert_file() const { return dir + "/ca.pem"; }
    std::string key_file() const { return dir + "/ca.key"; }
};

/// Loads the CA in `dir`, or makes one (EC P-256, ten years) when there is none. Throws
/// std::runtime_error naming the file on any failure.
lab_ca open_or_make_ca(const std::string& dir, const std::string& common_name = "dmzproxy lab CA");

struct issued {
    std::string cert_file;  ///< leaf, then the CA: a chain a server can present
    std::string key_file;
};

/// Issues (or reuses, when one with the same names exists) a leaf certificate for `names`
/// (DNS names or IP addresses; the first is the subject CN) signed by `ca`, written as
/// `<dir>/<file_stem>.pem` and `.key`. Throws std::runtime_error on failure.
issued issue_leaf(const lab_ca& ca, const std::vector<std::string>& names, const std::string& dir,
                  const std::string& file_stem);

}  // namespace dmz::certs
