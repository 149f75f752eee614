// Loading a server certificate as an admin brings it: a PEM chain with its key (maybe
// encrypted), a PEM holding both, or a PKCS#12 file exported from Windows. `check` and the
// TLS server both load through here, so what check accepts is what run serves.
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/pkcs12.h>
#include <openssl/provider.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <variant>
#include <sys/stat.h>

#include "dmz/certs/certs.hpp"

namespace dmz::certs {

void x509_free::operator()(x509_st* x) const { X509_free(x); }
void pkey_free::operator()(evp_pkey_st* k) const { EVP_PKEY_free(k); }

namespace {

struct bio_free {
    void operator()(BIO* b) const { BIO_free(b); }
};
struct p12_free {
    void operator()(PKCS12* p) const { PKCS12_free(p); }
};
using bio_ptr = std::unique_ptr<BIO, bio_free>;
using p12_ptr = std::unique_ptr<PKCS12, p12_free>;

/// The reason of the latest OpenSSL error, and an empty queue afterwards.
std::string take_ssl_error() {
    unsigned long e = ERR_peek_last_error();
    char buf[256] = "unknown OpenSSL error";
    if (e) ERR_error_string_n(e, buf, sizeof buf);
    ERR_clear_error();
    return buf;
}

bool queue_has_reason(int lib, int reason) {
    for (unsigned long e; (e = ERR_get_error()) != 0;)
        if (ERR_GET_LIB(e) == lib && ERR_GET_REASON(e) == reason) {
            ERR_clear_error();
            return true;
        }
    return false;
}

load_error fail(load_problem p, file_role r, std::string message, std::string hint = {}) {
    return {p, r, std::move(message), std::move(hint)};
}

std::optional<std::string> read_all(const std::string& path, std::string& why) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        why = "cannot read '" + path + "': " + std::strerror(errno);
        return std::nullopt;
    }
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (in.bad()) {
        why = "cannot read '" + path + "'";
        return std::nullopt;
    }
    return bytes;
}

bio_ptr memory_bio(const std::string& bytes) {
    return bio_ptr(BIO_new_mem_buf(bytes.data(), static_cast<int>(bytes.size())));
}

bool is_pem(const std::string& bytes) { return bytes.find("-----BEGIN ") != std::string::npos; }

/// The password callback's view of the password file: asked says the key was encrypted.
struct password_source {
    const std::optional<std::string>* password;
    bool asked = false;
};

int password_cb(char* buf, int size, int, void* u) {
    auto* src = static_cast<password_source*>(u);
    src->asked = true;
    if (!*src->password) return 0;
    const auto& pw = **src->password;
    if (size <= 0 || pw.size() > static_cast<std::size_t>(size)) return 0;
    std::memcpy(buf, pw.data(), pw.size());
    return static_cast<int>(pw.size());
}

std::vector<x509_handle> pem_certificates(const std::string& bytes) {
    std::vector<x509_handle> out;
    auto bio = memory_bio(bytes);
    while (bio) {
        X509* x = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr);
        if (!x) break;
        out.emplace_back(x);
    }
    ERR_clear_error();  // the end of the file reads as "no start line"
    return out;
}

/// A PEM private key from `bytes` (the key file, or the cert file holding both).
std::variant<pkey_handle, load_error> pem_key(const std::string& bytes, const std::string& file, file_role role,
                                              const std::optional<std::string>& password) {
    auto bio = memory_bio(bytes);
    password_source src{&password};
    EVP_PKEY* k = bio ? PEM_read_bio_PrivateKey(bio.get(), nullptr, &password_cb, &src) : nullptr;
    if (k) return pkey_handle(k);
    auto why = take_ssl_error();
    if (src.asked && !password)
        return fail(load_problem::bad_password, role, "the key in '" + file + "' is encrypted and no password_file is given",
                    "add password_file = \"...\" (a file whose first line is the password, mode 0600)");
    if (src.asked)
        return fail(load_problem::bad_password, file_role::password, "wrong password for the key in '" + file + "' (" + why + ")",
                    "the password file's first line is the password; no trailing spaces");
    return fail(load_problem::unreadable, role, "'" + file + "' holds no PEM private key (" + why + ")",
                role == file_role::cert ? "give key = \"...\", or a PKCS#12 (.pfx) file that holds the key"
                                        : "a PEM key begins with -----BEGIN PRIVATE KEY----- (or RSA/EC/ENCRYPTED PRIVATE KEY)");
}

int parse_p12(PKCS12* p12, const char* pass, EVP_PKEY** key, X509** cert, STACK_OF(X509)** ca) {
    return PKCS12_parse(p12, pass, key, cert, ca);
}

/// Older Windows exports encrypt with RC2-40 or 3DES: OpenSSL 3 keeps RC2 in its legacy
/// provider, loaded for this one parse.
int parse_p12_legacy(PKCS12* p12, const char* pass, EVP_PKEY** key, X509** cert, STACK_OF(X509)** ca) {
    OSSL_PROVIDER* legacy = OSSL_PROVIDER_try_load(nullptr, "legacy", 1);
    if (!legacy) return 0;
    int ok = parse_p12(p12, pass, key, cert, ca);
    if (OSSL_PROVIDER_unload(legacy) != 1) ERR_clear_error();
    return ok;
}

std::optional<load_error> pkcs12(const std::string& bytes, const key_pair_files& f, const std::optional<std::string>& password,
                                 key_pair& out) {
    auto bio = memory_bio(bytes);
    p12_ptr p12(bio ? d2i_PKCS12_bio(bio.get(), nullptr) : nullptr);
    if (!p12) {
        ERR_clear_error();
        // A DER certificate (Windows' .cer): the leaf alone, its key elsewhere.
        auto der = memory_bio(bytes);
        if (X509* x = der ? d2i_X509_bio(der.get(), nullptr) : nullptr) {
            out.leaf.reset(x);
            return std::nullopt;
        }
        ERR_clear_error();
        return fail(load_problem::unreadable, file_role::cert, "'" + f.cert_file + "' is neither PEM nor PKCS#12 (.pfx)",
                    "give a PEM certificate chain, or the .pfx exported with its private key");
    }
    const char* pass = password ? password->c_str() : nullptr;
    EVP_PKEY* key = nullptr;
    X509* leaf = nullptr;
    STACK_OF(X509)* ca = nullptr;
    int ok = parse_p12(p12.get(), pass, &key, &leaf, &ca);
    if (ok != 1 && queue_has_reason(ERR_LIB_PKCS12, PKCS12_R_MAC_VERIFY_FAILURE)) {
        if (!password)
            return fail(load_problem::bad_password, file_role::cert, "'" + f.cert_file + "' is protected by a password and no password_file is given",
                        "add password_file = \"...\" (a file whose first line is the PFX password, mode 0600)");
        return fail(load_problem::bad_password, file_role::password, "wrong password for '" + f.cert_file + "' (from '" + f.password_file + "')",
                    "the password file's first line is the password given at export; no trailing spaces");
    }
    if (ok != 1) {
        ERR_clear_error();
        ok = parse_p12_legacy(p12.get(), pass, &key, &leaf, &ca);
    }
    if (ok != 1)
        return fail(load_problem::unreadable, file_role::cert, "cannot read PKCS#12 '" + f.cert_file + "': " + take_ssl_error(),
                    "convert it: openssl pkcs12 -legacy -in old.pfx -nodes -out mail.pem");
    out.key.reset(key);
    out.leaf.reset(leaf);
    for (int i = 0; ca && i < sk_X509_num(ca); ++i) out.chain.emplace_back(sk_X509_value(ca, i));
    sk_X509_free(ca);  // the certificates now belong to out.chain
    if (!out.leaf && !out.chain.empty()) {  // certificates only: the first is the leaf
        out.leaf = std::move(out.chain.front());
        out.chain.erase(out.chain.begin());
    }
    if (!out.leaf)
        return fail(load_problem::unreadable, file_role::cert, "'" + f.cert_file + "' holds no certificate",
                    "export the certificate with its private key (Export-ExchangeCertificate, or the MMC: 'Yes, export the private key')");
    return std::nullopt;
}

std::optional<load_error> pem_chain(const std::string& bytes, const key_pair_files& f, const std::optional<std::string>& password,
                                    bool need_key, key_pair& out) {
    auto all = pem_certificates(bytes);
    if (all.empty()) {
        if (bytes.find("PRIVATE KEY-----") != std::string::npos)
            return fail(load_problem::unreadable, file_role::cert, "'" + f.cert_file + "' holds a key but no certificate");
        return fail(load_problem::unreadable, file_role::cert, "'" + f.cert_file + "' holds no PEM certificate",
                    "a PEM certificate begins with -----BEGIN CERTIFICATE-----");
    }
    out.leaf = std::move(all.front());
    std::move(all.begin() + 1, all.end(), std::back_inserter(out.chain));
    if (!f.key_file.empty() || (!need_key && bytes.find("PRIVATE KEY-----") == std::string::npos)) return std::nullopt;
    auto k = pem_key(bytes, f.cert_file, file_role::cert, password);
    if (auto* e = std::get_if<load_error>(&k)) return *e;
    out.key = std::move(std::get<pkey_handle>(k));
    return std::nullopt;
}

/// Intermediates in issuing order from the leaf up; anything unrelated stays at the end.
void order_chain(key_pair& p) {
    std::vector<x509_handle> rest = std::move(p.chain), ordered;
    X509* cur = p.leaf.get();
    for (;;) {
        auto it = std::find_if(rest.begin(), rest.end(), [&](auto& c) { return X509_check_issued(c.get(), cur) == X509_V_OK; });
        if (it == rest.end()) break;
        cur = it->get();
        ordered.push_back(std::move(*it));
        rest.erase(it);
    }
    for (auto& r : rest) ordered.push_back(std::move(r));
    p.chain = std::move(ordered);
}

std::optional<std::string> read_password(const std::string& file, std::string& why) {
    auto bytes = read_all(file, why);
    if (!bytes) return std::nullopt;
    auto line = bytes->substr(0, bytes->find('\n'));
    if (!line.empty() && line.back() == '\r') line.pop_back();
    return line;
}

}  // namespace

load_result load_key_pair(const key_pair_files& f, bool need_key) {
    load_result r;
    std::string why;
    std::optional<std::string> password;
    if (!f.password_file.empty() && !(password = read_password(f.password_file, why)))
        return {std::nullopt, fail(load_problem::unreadable, file_role::password, why)};
    auto bytes = read_all(f.cert_file, why);
    if (!bytes) return {std::nullopt, fail(load_problem::unreadable, file_role::cert, why)};
    key_pair p;
    auto err = is_pem(*bytes) ? pem_chain(*bytes, f, password, need_key, p) : pkcs12(*bytes, f, password, p);
    if (err) return {std::nullopt, err};
    if (f.key_file.empty() && !p.key && need_key)
        return {std::nullopt, fail(load_problem::unreadable, file_role::cert, "'" + f.cert_file + "' holds no private key",
                                   "give key = \"...\", or the .pfx exported with its private key")};
    if (!f.key_file.empty()) {
        auto key_bytes = read_all(f.key_file, why);
        if (!key_bytes) return {std::nullopt, fail(load_problem::unreadable, file_role::key, why)};
        auto k = pem_key(*key_bytes, f.key_file, file_role::key, password);
        if (auto* e = std::get_if<load_error>(&k)) return {std::nullopt, *e};
        p.key = std::move(std::get<pkey_handle>(k));
    }
    if ((need_key || p.key) && X509_check_private_key(p.leaf.get(), p.key.get()) != 1) {
        ERR_clear_error();
        auto role = f.key_file.empty() ? file_role::cert : file_role::key;
        auto from = f.key_file.empty() ? f.cert_file : f.key_file;
        return {std::nullopt, fail(load_problem::key_mismatch, role, "the key in '" + from + "' does not belong to the certificate in '" + f.cert_file + "'",
                                   "give the key made with this certificate's request (compare: openssl x509 -noout -pubkey / openssl pkey -pubout)")};
    }
    order_chain(p);
    r.pair = std::move(p);
    return r;
}

bool issuer_known(x509_st* cert, const std::vector<x509_handle>& chain) {
    for (auto& c : chain)
        if (X509_check_issued(c.get(), cert) == X509_V_OK) return true;
    std::unique_ptr<X509_STORE, void (*)(X509_STORE*)> store(X509_STORE_new(), &X509_STORE_free);
    std::unique_ptr<X509_STORE_CTX, void (*)(X509_STORE_CTX*)> ctx(X509_STORE_CTX_new(), &X509_STORE_CTX_free);
    if (!store || !ctx || X509_STORE_set_default_paths(store.get()) != 1 || X509_STORE_CTX_init(ctx.get(), store.get(), cert, nullptr) != 1) {
        ERR_clear_error();
        return false;
    }
    X509* issuer = nullptr;
    bool found = X509_STORE_CTX_get1_issuer(&issuer, ctx.get(), cert) == 1;
    X509_free(issuer);
    ERR_clear_error();
    return found;
}

}  // namespace dmz::certs
