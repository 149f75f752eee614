#pragma once
// TLS contexts: per-listener server contexts chosen by SNI, and verifying client contexts
// toward upstreams. Startup failures throw; nothing here runs per request except the SNI
// callback.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dmz/rules/model.hpp"
#include "net/asio.hpp"

namespace dmz::proxy {

/// The certificates of one https listener. Clients without SNI, or with a name no
/// certificate carries, get the default certificate.
class server_tls {
public:
    /// Throws std::runtime_error naming the file on unreadable certificates or keys.
    explicit server_tls(const rules::listener& l);
    net::ssl::context& default_context() { return *default_; }

private:
    static int on_servername(SSL* ssl, int* alert, void* arg);
    struct entry {
        std::vector<std::string> names;
        std::shared_ptr<net::ssl::context> ctx;
    };
    std::vector<entry> entries_;
    std::shared_ptr<net::ssl::context> default_;
};

/// Client contexts toward upstreams, one per CA file, owned by one worker thread.
class client_tls {
public:
    /// Throws std::runtime_error when the CA file cannot be loaded.
    net::ssl::context& context(const std::string& ca_file);

private:
    std::map<std::string, std::unique_ptr<net::ssl::context>> by_ca_;
};

/// Prepares an upstream TLS stream: SNI and the name to verify on the certificate.
void prepare_client(SSL* ssl, const std::string& name);

/// Why an upstream handshake failed, for X-Dmz-Error: "name mismatch: ...", "untrusted
/// chain: ..." or "handshake failure: ...".
std::string describe_client_failure(SSL* ssl, const net::error_code& ec, const std::string& name);

/// The DNS names on the certificate the peer presented, also after a handshake that
/// refused it (a name mismatch, an untrusted chain).
std::vector<std::string> presented_names(SSL* ssl);

/// The SNI the client sent, or "".
std::string server_name(SSL* ssl);

}  // namespace dmz::proxy
