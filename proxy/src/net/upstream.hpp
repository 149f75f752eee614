#pragma once
// Upstream connections and the per-worker keep-alive pool. One pool per worker thread: no
// locks. Pinned (NTLM/Negotiate) connections never enter the pool.
#include <chrono>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "net/buffer.hpp"
#include "dmz/rules/model.hpp"
#include "fault.hpp"
#include "net/asio.hpp"
#include "net/tls.hpp"

namespace dmz::proxy {

struct upstream_conn {
    upstream_conn(net::stream s, std::string k) : stream(std::move(s)), key(std::move(k)) {}
    net::stream stream;
    std::string key;
    flat_buffer in;
    std::chrono::steady_clock::time_point idle_since{};
    std::uint64_t requests = 0;
};

/// "127.0.0.1:443", "[::1]:443".
std::string endpoint_text(const rules::ip_address& a, std::uint16_t port);

/// Connects (and, for TLS targets, handshakes and verifies) within the target's connect
/// timeout. On failure returns null and fills `f` with the class and a detail that says
/// which: refused (10061), timed out (10060), no route (10065), name mismatch, untrusted
/// chain, handshake failure. `faults`: the session's fault plan (tests; null otherwise),
/// which the new connection shares. `presented` (probes): on a failed handshake, the names
/// of the certificate the server presented.
net::task<std::shared_ptr<upstream_conn>> connect_upstream(net::asio::io_context& io, client_tls& tls, const rules::target& to,
                                                           std::string key, rules::fault& f, net::fault_plan* faults,
                                                           std::vector<std::string>* presented = nullptr);

/// Whether an idle connection is still open (the peer has not closed it).
bool still_open(upstream_conn& c);

class upstream_pool {
public:
    /// The most recently used idle connection for `key` that is still open, or null.
    /// An idle connection for `key`. `check` peeks at it first (a system call) to weed out
    /// one the server closed; without it, one idle under a second is taken as it is.
    std::shared_ptr<upstream_conn> take(const std::string& key, std::chrono::milliseconds idle_timeout, bool check = true);
    void put(std::shared_ptr<upstream_conn> c);
    std::size_t idle_count() const;

private:
    std::unordered_map<std::string, std::vector<std::shared_ptr<upstream_conn>>> idle_;
};

}  // namespace dmz::proxy
