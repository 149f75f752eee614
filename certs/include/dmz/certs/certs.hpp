#pragma once
/// @file Lab PKI, certificate loading and inspection (OpenSSL). Nothing here touches sockets.
#include <ctime>
#include <memory>
#include <optional>
#include <string>
#include <vector>

struct x509_st;
struct evp_pkey_st;

namespace dmz::certs {

struct certificate_info {
    std::string subject;
    std::string issuer;
    std::vector<std::string> dns_names;  ///< subjectAltName DNS entries, lower case
    std::string common_name;
    std::time_t not_before = 0, not_after = 0;
    std::string sha256;  ///< fingerprint of the DER certificate, hex with colons
    bool self_signed = false;
};

/// Reads the first certificate of a PEM file, or the leaf of a PFX without a password.
/// On failure returns nullopt and sets *error.
std::optional<certificate_info> read_certificate(const std::string& pem_path, std::string* error);

struct x509_free {
    void operator()(x509_st* x) const;
};
struct pkey_free {
    void operator()(evp_pkey_st* k) const;
};
using x509_handle = std::unique_ptr<x509_st, x509_free>;
using pkey_handle = std::unique_ptr<evp_pkey_st, pkey_free>;

/// Where a server certificate and its key come from, as a listener's config names them.
struct key_pair_files {
    std::string cert_file;      ///< PEM (leaf, intermediates, maybe the key) or PKCS#12 (.pfx, .p12)
    std::string key_file;       ///< PEM key (maybe encrypted); empty: the key is in cert_file
    std::string password_file;  ///< first line is the password; empty: none
};

/// A loaded certificate: the leaf, the intermediates ordered from the leaf up, the key.
struct key_pair {
    x509_handle leaf;
    std::vector<x509_handle> chain;
    pkey_handle key;
};

/// Why a key pair did not load, and which of the three config keys it is about.
enum class load_problem { unreadable, bad_password, key_mismatch };
enum class file_role { cert, key, password };
struct load_error {
    load_problem problem = load_problem::unreadable;
    file_role role = file_role::cert;
    std::string message;  ///< names the file and the reason
    std::string hint;
};

struct load_result {
    std::optional<key_pair> pair;
    std::optional<load_error> error;
};

/// Loads a certificate, its chain and its key from PEM or PKCS#12 files, decrypting with the
/// password file's first line; the key must match the leaf. Never throws. With
/// `need_key` false, a PEM certificate without its key loads too (for `certs show`).
load_result load_key_pair(const key_pair_files& files, bool need_key = true);

/// Inspects a loaded certificate (leaf or intermediate).
certificate_info describe(x509_st* cert);

/// Whether `cert`'s issuer is among `chain`, or in the system trust store.
bool issuer_known(x509_st* cert, const std::vector<x509_handle>& chain);

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
