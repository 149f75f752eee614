#include "net/tls.hpp"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <stdexcept>

#include "dmz/certs/certs.hpp"
#include "dmz/rules/evaluate.hpp"

namespace dmz::proxy {

namespace {

std::string openssl_error() {
    unsigned long e = ERR_get_error();
    if (!e) return "unknown error";
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    return buf;
}

void harden(net::ssl::context& ctx) {
    SSL_CTX* c = ctx.native_handle();
    SSL_CTX_set_min_proto_version(c, TLS1_2_VERSION);
    SSL_CTX_set_max_proto_version(c, TLS1_3_VERSION);
    SSL_CTX_set_options(c, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
    // Idle connections give their buffers back (OpenSSL allocates them again on use).
    SSL_CTX_set_mode(c, SSL_MODE_RELEASE_BUFFERS);
}

/// The same loader as `check` (certs::load_key_pair): PEM chains, PEM keys (encrypted
/// ones with password_file) and PKCS#12 files.
std::shared_ptr<net::ssl::context> load_server_context(const rules::certificate& cert) {
    auto loaded = certs::load_key_pair({cert.cert_file, cert.key_file, cert.password_file});
    if (!loaded.pair) throw std::runtime_error(loaded.error->message);
    auto ctx = std::make_shared<net::ssl::context>(net::ssl::context::tls_server);
    harden(*ctx);
    std::unique_ptr<STACK_OF(X509), void (*)(STACK_OF(X509)*)> chain(sk_X509_new_null(), [](STACK_OF(X509)* s) { sk_X509_free(s); });
    if (!chain) throw std::runtime_error("out of memory loading '" + cert.cert_file + "'");
    for (auto& c : loaded.pair->chain)
        if (sk_X509_push(chain.get(), c.get()) <= 0) throw std::runtime_error("out of memory loading '" + cert.cert_file + "'");
    // Takes its own references to the leaf, the key and each certificate of the chain.
    if (SSL_CTX_use_cert_and_key(ctx->native_handle(), loaded.pair->leaf.get(), loaded.pair->key.get(), chain.get(), 1) != 1)
        throw std::runtime_error("cannot use certificate '" + cert.cert_file + "': " + openssl_error());
    return ctx;
}

}  // namespace

server_tls::server_tls(const rules::listener& l) {
    for (auto& cert : l.certificates) {
        if (cert.cert_file.empty())
            throw std::runtime_error("listener '" + l.name + "': certificate for " +
                                     (cert.names.empty() ? std::string("?") : cert.names.front()) +
                                     " has no files (lab certificates need 'dmzproxy lab up')");
        entries_.push_back({cert.names, load_server_context(cert)});
    }
    if (entries_.empty()) throw std::runtime_error("https listener '" + l.name + "' has no certificate");
    default_ = entries_.front().ctx;
    for (auto& e : entries_)
        for (auto& n : e.names)
            if (n == l.default_certificate) default_ = e.ctx;
    for (auto& e : entries_) {
        SSL_CTX_set_tlsext_servername_callback(e.ctx->native_handle(), &server_tls::on_servername);
        SSL_CTX_set_tlsext_servername_arg(e.ctx->native_handle(), this);
    }
}

int server_tls::on_servername(SSL* ssl, int*, void* arg) {
    auto* self = static_cast<server_tls*>(arg);
    const char* sni = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    if (!sni) return SSL_TLSEXT_ERR_OK;
    for (auto& e : self->entries_)
        for (auto& n : e.names)
            if (rules::host_matches(n, sni)) {
                SSL_set_SSL_CTX(ssl, e.ctx->native_handle());
                return SSL_TLSEXT_ERR_OK;
            }
    return SSL_TLSEXT_ERR_OK;  // unknown name: keep the default certificate
}

net::ssl::context& client_tls::context(const std::string& ca_file) {
    auto it = by_ca_.find(ca_file);
    if (it != by_ca_.end()) return *it->second;
    auto ctx = std::make_unique<net::ssl::context>(net::ssl::context::tls_client);
    harden(*ctx);
    if (ca_file.empty()) {
        net::error_code ec;
        ctx->set_default_verify_paths(ec);
    } else if (SSL_CTX_load_verify_locations(ctx->native_handle(), ca_file.c_str(), nullptr) != 1) {
        throw std::runtime_error("cannot load CA file '" + ca_file + "': " + openssl_error());
    }
    ctx->set_verify_mode(net::ssl::verify_peer);
    // Resume sessions toward the same upstream: a full handshake per connection is the
    // dearest thing on the upstream path.
    SSL_CTX_set_session_cache_mode(ctx->native_handle(), SSL_SESS_CACHE_CLIENT);
    return *by_ca_.emplace(ca_file, std::move(ctx)).first->second;
}

void prepare_client(SSL* ssl, const std::string& name) {
    if (name.empty()) return;
    SSL_set_tlsext_host_name(ssl, name.c_str());
    SSL_set1_host(ssl, name.c_str());
    SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
}

std::string describe_client_failure(SSL* ssl, const net::error_code& ec, const std::string& name) {
    long v = ssl ? SSL_get_verify_result(ssl) : X509_V_OK;
    if (v == X509_V_ERR_HOSTNAME_MISMATCH)
        return "name mismatch: the upstream certificate is not for '" + name + "'";
    if (v != X509_V_OK)
        return std::string("untrusted chain: ") + X509_verify_cert_error_string(v);
    return "handshake failure: " + ec.message();
}

std::string server_name(SSL* ssl) {
    const char* sni = ssl ? SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name) : nullptr;
    return sni ? sni : "";
}

std::vector<std::string> presented_names(SSL* ssl) {
    if (!ssl) return {};
    // A refused certificate never becomes "the peer's": it is only in the chain received.
    X509* leaf = SSL_get0_peer_certificate(ssl);
    if (!leaf) {
        auto* chain = SSL_get_peer_cert_chain(ssl);
        if (chain && sk_X509_num(chain) > 0) leaf = sk_X509_value(chain, 0);
    }
    if (!leaf) return {};
    return certs::describe(leaf).dns_names;
}

}  // namespace dmz::proxy
