#include "dmz/certs/certs.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>

namespace dmz::certs {

namespace {
std::time_t to_time(const ASN1_TIME* t);

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

namespace {
std::time_t to_time(const ASN1_TIME* t) {
    struct tm tm {};
    if (!t || ASN1_TIME_to_tm(t, &tm) != 1) return 0;
    return timegm(&tm);
}
}  // namespace

certificate_info describe(x509_st* cert) {
    certificate_info info;
    char buf[512] = {};
    X509_NAME_oneline(X509_get_subject_name(cert), buf, sizeof buf);
    info.subject = buf;
    X509_NAME_oneline(X509_get_issuer_name(cert), buf, sizeof buf);
    info.issuer = buf;
    int len = X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, buf, sizeof buf);
    if (len > 0) info.common_name = lower(std::string(buf, static_cast<std::size_t>(len)));
    auto* sans = static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
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
    info.not_before = to_time(X509_get0_notBefore(cert));
    info.not_after = to_time(X509_get0_notAfter(cert));
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (X509_digest(cert, EVP_sha256(), md, &n) == 1) {
        static const char* hex = "0123456789ABCDEF";
        for (unsigned i = 0; i < n; ++i) {
            if (i) info.sha256 += ':';
            info.sha256 += hex[md[i] >> 4];
            info.sha256 += hex[md[i] & 15];
        }
    }
    info.self_signed = X509_self_signed(cert, 0) == 1;
    ERR_clear_error();
    return info;
}

std::optional<certificate_info> read_certificate(const std::string& pem_path, std::string* error) {
    std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(pem_path.c_str(), "rb"), &std::fclose);
    if (!f) {
        if (error) *error = "cannot open '" + pem_path + "'";
        return std::nullopt;
    }
    std::unique_ptr<X509, void (*)(X509*)> cert(PEM_read_X509(f.get(), nullptr, nullptr, nullptr), &X509_free);
    if (!cert) {
        ERR_clear_error();
        if (error) *error = "'" + pem_path + "' holds no PEM certificate";
        return std::nullopt;
    }
    return describe(cert.get());
}

bool certificate_covers(const certificate_info& cert, const std::string& host) {
    auto h = lower(host);
    if (!cert.dns_names.empty())
        return std::any_of(cert.dns_names.begin(), cert.dns_names.end(), [&](auto& n) { return name_matches(n, h); });
    return !cert.common_name.empty() && name_matches(cert.common_name, h);
}

}  // namespace dmz::certs

// ---- lab PKI ---------------------------------------------------------------------------

#include <openssl/bn.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <stdexcept>

namespace dmz::certs {

namespace {

namespace fs = std::filesystem;

std::string ssl_error() {
    unsigned long e = ERR_get_error();
    char buf[256] = "unknown OpenSSL error";
    if (e) ERR_error_string_n(e, buf, sizeof buf);
    return buf;
}

using pkey_ptr = std::unique_ptr<EVP_PKEY, void (*)(EVP_PKEY*)>;
using x509_ptr = std::unique_ptr<X509, void (*)(X509*)>;
using file_ptr = std::unique_ptr<FILE, int (*)(FILE*)>;

pkey_ptr make_key() {
    EVP_PKEY* k = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
    if (!k) throw std::runtime_error("key generation failed: " + ssl_error());
    return {k, &EVP_PKEY_free};
}

file_ptr open_file(const std::string& path, const char* mode, bool secret = false) {
    if (secret) {
        // Keys are readable by their owner only, from the moment they exist.
        int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd < 0) throw std::runtime_error("cannot write '" + path + "': " + std::strerror(errno));
        return {fdopen(fd, mode), &std::fclose};
    }
    file_ptr f(std::fopen(path.c_str(), mode), &std::fclose);
    if (!f) throw std::runtime_error("cannot open '" + path + "': " + std::strerror(errno));
    return f;
}

void write_key(const std::string& path, EVP_PKEY* key);

void write_cert(FILE* f, X509* c, const std::string& path) {
    if (PEM_write_X509(f, c) != 1) throw std::runtime_error("cannot write certificate '" + path + "': " + ssl_error());
}

pkey_ptr read_key(const std::string& path) {
    auto f = open_file(path, "rb");
    EVP_PKEY* k = PEM_read_PrivateKey(f.get(), nullptr, nullptr, nullptr);
    if (!k) throw std::runtime_error("cannot read key '" + path + "': " + ssl_error());
    return {k, &EVP_PKEY_free};
}

x509_ptr read_cert(const std::string& path) {
    auto f = open_file(path, "rb");
    X509* c = PEM_read_X509(f.get(), nullptr, nullptr, nullptr);
    if (!c) throw std::runtime_error("cannot read certificate '" + path + "': " + ssl_error());
    return {c, &X509_free};
}

void add_ext(X509* cert, X509* issuer, int nid, const std::string& value) {
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
    if (!ext) throw std::runtime_error("bad certificate extension '" + value + "': " + ssl_error());
    X509_add_ext(cert, ext, -1);
    X509_EXTENSION_free(ext);
}

x509_ptr new_cert(EVP_PKEY* key, const std::string& cn, long days) {
    x509_ptr c(X509_new(), &X509_free);
    X509_set_version(c.get(), 2);
    unsigned char serial[16];
    if (RAND_bytes(serial, sizeof serial) != 1) throw std::runtime_error("no random bytes for a certificate serial: " + ssl_error());
    serial[0] &= 0x7f;
    BIGNUM* bn = BN_bin2bn(serial, sizeof serial, nullptr);
    BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(c.get()));
    BN_free(bn);
    X509_gmtime_adj(X509_getm_notBefore(c.get()), -3600);
    X509_gmtime_adj(X509_getm_notAfter(c.get()), days * 24 * 3600);
    X509_set_pubkey(c.get(), key);
    X509_NAME* name = X509_get_subject_name(c.get());
    X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, reinterpret_cast<const unsigned char*>("dmzproxy lab"), -1, -1, 0);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
    return c;
}

/// Holds an exclusive flock on DIR/.lock: two instances starting together must not both
/// make a CA, nor read one half written.
class dir_lock {
public:
    explicit dir_lock(const std::string& dir) {
        fd_ = ::open((dir + "/.lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (fd_ < 0) throw std::runtime_error("cannot lock '" + dir + "/.lock': " + std::strerror(errno));
        while (::flock(fd_, LOCK_EX) != 0 && errno == EINTR) {
        }
    }
    ~dir_lock() { ::close(fd_); }
    dir_lock(const dir_lock&) = delete;
    dir_lock& operator=(const dir_lock&) = delete;

private:
    int fd_ = -1;
};

/// Writes through a temporary file renamed into place, so readers see all or nothing.
template <class F>
void write_atomically(const std::string& path, bool secret, F&& fill) {
    auto tmp = path + ".tmp";
    {
        auto f = open_file(tmp, "wb", secret);
        fill(f.get());
        if (std::fflush(f.get()) != 0) throw std::runtime_error("cannot write '" + tmp + "': " + std::strerror(errno));
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0)
        throw std::runtime_error("cannot rename '" + tmp + "' to '" + path + "': " + std::strerror(errno));
}

bool is_ip(const std::string& s) {
    unsigned char buf[16];
    return inet_pton(AF_INET, s.c_str(), buf) == 1 || inet_pton(AF_INET6, s.c_str(), buf) == 1;
}

void write_key(const std::string& path, EVP_PKEY* key) {
    write_atomically(path, true, [&](FILE* f) {
        if (PEM_write_PrivateKey(f, key, nullptr, nullptr, 0, nullptr, nullptr) != 1)
            throw std::runtime_error("cannot write key '" + path + "': " + ssl_error());
    });
}

}  // namespace

lab_ca open_or_make_ca(const std::string& dir, const std::string& common_name) {
    lab_ca ca{dir};
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) throw std::runtime_error("cannot create '" + dir + "': " + ec.message());
    dir_lock lock(dir);
    if (fs::exists(ca.cert_file()) && fs::exists(ca.key_file())) {
        read_cert(ca.cert_file());  // readable, or say which file is broken
        read_key(ca.key_file());
        return ca;
    }
    auto key = make_key();
    auto cert = new_cert(key.get(), common_name, 3650);
    X509_set_issuer_name(cert.get(), X509_get_subject_name(cert.get()));
    add_ext(cert.get(), cert.get(), NID_basic_constraints, "critical,CA:TRUE,pathlen:0");
    add_ext(cert.get(), cert.get(), NID_key_usage, "critical,keyCertSign,cRLSign");
    add_ext(cert.get(), cert.get(), NID_subject_key_identifier, "hash");
    if (X509_sign(cert.get(), key.get(), EVP_sha256()) == 0) throw std::runtime_error("signing the CA failed: " + ssl_error());
    write_key(ca.key_file(), key.get());
    write_atomically(ca.cert_file(), false, [&](FILE* f) { write_cert(f, cert.get(), ca.cert_file()); });
    return ca;
}

issued issue_leaf(const lab_ca& ca, const std::vector<std::string>& names, const std::string& dir, const std::string& file_stem) {
    if (names.empty()) throw std::runtime_error("a certificate needs at least one name");
    issued out{dir + "/" + file_stem + ".pem", dir + "/" + file_stem + ".key"};
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) throw std::runtime_error("cannot create '" + dir + "': " + ec.message());
    dir_lock lock(dir);
    // Reuse a leaf that already carries these names.
    if (fs::exists(out.cert_file) && fs::exists(out.key_file)) {
        std::string err;
        if (auto info = read_certificate(out.cert_file, &err)) {
            // Exactly the same DNS names: a broader certificate would hide a scenario whose
            // point is a name missing from it.
            std::vector<std::string> want;
            for (auto& n : names)
                if (!is_ip(n)) want.push_back(lower(n));
            auto have = info->dns_names;
            std::sort(want.begin(), want.end());
            want.erase(std::unique(want.begin(), want.end()), want.end());
            std::sort(have.begin(), have.end());
            if (want == have) return out;
        }
    }
    auto ca_cert = read_cert(ca.cert_file());
    auto ca_key = read_key(ca.key_file());
    auto key = make_key();
    auto cert = new_cert(key.get(), names.front(), 825);
    X509_set_issuer_name(cert.get(), X509_get_subject_name(ca_cert.get()));
    std::string san;
    for (auto& n : names) san += (san.empty() ? "" : ",") + std::string(is_ip(n) ? "IP:" : "DNS:") + n;
    add_ext(cert.get(), ca_cert.get(), NID_subject_alt_name, san);
    add_ext(cert.get(), ca_cert.get(), NID_basic_constraints, "critical,CA:FALSE");
    add_ext(cert.get(), ca_cert.get(), NID_key_usage, "critical,digitalSignature");
    add_ext(cert.get(), ca_cert.get(), NID_ext_key_usage, "serverAuth,clientAuth");
    add_ext(cert.get(), ca_cert.get(), NID_authority_key_identifier, "keyid:always");
    if (X509_sign(cert.get(), ca_key.get(), EVP_sha256()) == 0) throw std::runtime_error("signing failed: " + ssl_error());
    write_key(out.key_file, key.get());
    write_atomically(out.cert_file, false, [&](FILE* f) {
        write_cert(f, cert.get(), out.cert_file);
        write_cert(f, ca_cert.get(), out.cert_file);
    });
    return out;
}

}  // namespace dmz::certs
