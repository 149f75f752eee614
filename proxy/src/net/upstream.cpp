#include "net/upstream.hpp"

#include <sys/socket.h>
#include <unistd.h>

namespace dmz::proxy {

namespace {
constexpr std::size_t max_idle_per_key = 256;
}  // namespace

/// An idle connection is usable when the peer has not closed it. A plain connection must
/// also have nothing to read (an idle upstream has nothing to say); TLS may hold session
/// tickets, so only EOF or an error disqualifies it.
bool still_open(upstream_conn& c) {
    char b;
    ssize_t n = ::recv(c.stream.socket().native_handle(), &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) return false;
    if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK;
    return c.stream.is_tls();
}

std::string endpoint_text(const rules::ip_address& a, std::uint16_t port) {
    return (a.is_v4() ? a.to_string() : "[" + a.to_string() + "]") + ":" + std::to_string(port);
}

net::task<std::shared_ptr<upstream_conn>> connect_upstream(net::asio::io_context& io, client_tls& tls, const rules::target& to,
                                                           std::string key, rules::fault& f, net::fault_plan* faults,
                                                           std::vector<std::string>* presented) {
using namespace net;
    std::optional<stream> s;
    if (to.tls) {
        try {
            s.emplace(tcp::socket(io), tls.context(to.ca_file));
        } catch (const std::exception& e) {
            f = make_fault(fault_class::upstream_tls, 502, e.what());
            co_return nullptr;
        }
        prepare_client(s->native_tls(), to.name);
    } else {
        s.emplace(tcp::socket(io));
    }
    s->set_faults(faults);
    auto addr = asio::ip::make_address(to.address->to_string());
    tcp::endpoint ep(addr, to.port);
    error_code ec;
    s->socket().open(ep.protocol(), ec);
    if (!ec && to.source) s->socket().bind(tcp::endpoint(asio::ip::make_address(to.source->to_string()), 0), ec);
    if (ec) {
        f = make_fault(fault_class::upstream_connect, 502, "cannot open a socket from " + (to.source ? to.source->to_string() : "any") + ": " + ec.message());
        co_return nullptr;
    }
    watchdog dog(io, *s);
    dog.arm(to.timeouts.connect);
    if (s->fails(op_kind::connect)) co_await s->fail(op_kind::connect, ec);
    else co_await s->socket().async_connect(ep, redirect(ec));
    if (ec) {
        auto what = endpoint_text(*to.address, to.port);
        if (dog.expired())
            f = make_fault(fault_class::upstream_connect, 502, "connecting to " + what + " timed out after " + std::to_string(to.timeouts.connect.count() / 1000) + " s (10060)");
        else if (ec == asio::error::connection_refused)
            f = make_fault(fault_class::upstream_connect, 502, "connection refused by " + what + " (10061)");
        else if (ec == asio::error::network_unreachable || ec == asio::error::host_unreachable)
            f = make_fault(fault_class::upstream_connect, 502, "no route to " + what + " (10065)");
        else
            f = make_fault(fault_class::upstream_connect, 502, "connecting to " + what + ": " + ec.message());
        co_return nullptr;
    }
    // Boost 1.74's reactor added EPOLLOUT to this descriptor's epoll registration for the
    // connect and never takes it off: every ACK of a request would then wake the worker,
    // and a late wake-up leaves Asio's "try a read at once" flag set, so the next read of a
    // response is a recvfrom that finds nothing. Registered afresh, the connection is
    // watched for input only (writes that do not fit still add EPOLLOUT when they wait).
    auto tls_state = s->release_tls();
    auto fd = s->socket().release(ec);
    tcp::socket fresh(io);
    if (!ec) {
        fresh.assign(ep.protocol(), fd, ec);
        if (ec) ::close(fd);
    }
    if (ec) {
        f = make_fault(fault_class::upstream_connect, 502, "connected, but the socket could not be re-registered: " + ec.message());
        co_return nullptr;
    }
    s.emplace(std::move(fresh), std::move(tls_state));
    s->set_faults(faults);
    s->socket().set_option(tcp::no_delay(true), ec);
    if (to.tls) {
        co_await s->handshake(false, ec);
        if (ec) {
            if (presented) *presented = presented_names(s->native_tls());
            f = make_fault(dog.expired() ? fault_class::upstream_timeout : fault_class::upstream_tls, 502, dog.expired() ? std::string("TLS handshake timed out") : describe_client_failure(s->native_tls(), ec, to.name));
            co_return nullptr;
        }
    }
    dog.stop();
    co_return std::make_shared<upstream_conn>(std::move(*s), std::move(key));
}


std::shared_ptr<upstream_conn> upstream_pool::take(const std::string& key, std::chrono::milliseconds idle_timeout, bool check) {
    auto it = idle_.find(key);
    if (it == idle_.end()) return nullptr;
    auto& v = it->second;
    auto now = std::chrono::steady_clock::now();
    while (!v.empty()) {
        auto c = std::move(v.back());
        v.pop_back();
        if (now - c->idle_since >= idle_timeout) {
            c->stream.close();
            continue;
        }
        // Unchecked only when young and the caller can retry (a bodyless request).
        if ((!check && now - c->idle_since < std::chrono::seconds(1)) || still_open(*c)) return c;
        c->stream.close();
    }
    return nullptr;
}

void upstream_pool::put(std::shared_ptr<upstream_conn> c) {
    auto& v = idle_[c->key];
    if (v.size() >= max_idle_per_key) {
        v.front()->stream.close();
        v.erase(v.begin());
    }
    c->idle_since = std::chrono::steady_clock::now();
    c->in.release(16 * 1024);  // a head buffer stays; a body pump's grown one goes
    v.push_back(std::move(c));
}

std::size_t upstream_pool::idle_count() const {
    std::size_t n = 0;
    for (auto& [k, v] : idle_) n += v.size();
    return n;
}

}  // namespace dmz::proxy
