#pragma once
// Parked keep-alive connections: a client connection that has sat idle between requests
// for a moment leaves Asio (no descriptor state, no pending operation, no coroutine frame,
// no session object) and waits as a small record in a per-worker epoll set, the way nginx
// keeps an idle keep-alive connection in a few hundred bytes. When the client sends its
// next request (or goes away) the record becomes a session again. Phones and Outlook keep
// thousands of such connections open; each now costs about 100 bytes of this process's
// memory (plus OpenSSL's own state for TLS) instead of about 2 KiB.
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/posix/stream_descriptor.hpp>

#include "dmz/rules/ip.hpp"
#include "dmz/rules/model.hpp"
#include "metrics.hpp"
#include "net/asio.hpp"

namespace dmz::proxy {

/// What a parked HTTP connection keeps: enough to become a session again.
struct parked_connection {
    int fd = -1;
    bool v6 = false;
    rules::protocol proto = rules::protocol::http;
    net::stream::tls_handle tls;  ///< TLS: OpenSSL's state (its buffers already released)
    std::uint64_t id = 0;         ///< the connection id the access log shows
    rules::ip_address peer;
    std::string endpoint;    ///< the listening "address:port" that accepted it
    std::string counted_as;  ///< the listener whose open-connection gauge counts it
    std::chrono::steady_clock::time_point expires{};  ///< the idle timeout
};

class parking_lot {
public:
    /// How long a keep-alive connection idles inside its session before it is parked. Busy
    /// connections (a client sending its next request at once) never pay the extra epoll
    /// calls of parking and waking.
    static constexpr std::chrono::milliseconds park_after{50};
    /// With this many sessions already idling in their own wait, a connection going idle
    /// waits without a buffer (a readiness peek) until it parks, and a new connection
    /// after its first request parks at once: a burst of thousands of new idle
    /// connections never piles up as sessions.
    static constexpr int hot_sessions = 64;
    /// Sessions idling in their own wait now (kept by the sessions).
    int waiting = 0;

    explicit parking_lot(net::asio::io_context& io);
    ~parking_lot();
    parking_lot(const parking_lot&) = delete;
    parking_lot& operator=(const parking_lot&) = delete;

    /// Called with a connection whose client sent something (or closed): it becomes a
    /// session again, or is refused (then `close` must be called on it).
    std::function<void(parked_connection&&)> on_wake;
    /// Called once for every parked connection that closes here (idle timeout, drain,
    /// shutdown) and by whoever refuses a woken one: the accounting a session's end does.
    std::function<void(parked_connection&)> on_close;
    /// Counts the parked connections for /metrics and /status.
    metrics* stats = nullptr;

    /// Takes the connection; false (the connection untouched) when the epoll set refuses it.
    bool park(parked_connection&& c);
    /// Drain: every parked connection closes now.
    void close_all();
    /// Closes the descriptor and the TLS state, then on_close.
    void close(parked_connection& c);
    std::size_t size() const { return count_; }

private:
    /// One parked connection as stored: 64 bytes (the strings are interned).
    struct slot {
        int fd = -1;  ///< -1: free, and `next_free` links it
        bool v6 = false;
        rules::protocol proto = rules::protocol::http;
        std::uint16_t endpoint = 0, counted_as = 0;  ///< indexes into names_
        net::stream::tls_handle tls;
        std::uint64_t id = 0;
        rules::ip_address peer;
        std::chrono::steady_clock::time_point expires{};
        std::uint32_t next_free = 0;
    };
    static_assert(sizeof(slot) <= 64, "a parked connection's record grew: update the README's figure");
    static constexpr std::uint32_t block_size = 256;  ///< slots per block: no copying as the lot grows
    slot& at(std::uint32_t i) { return blocks_[i / block_size][i % block_size]; }
    std::uint16_t intern(const std::string& name);
    parked_connection take(std::uint32_t i);
    struct sweeper final : net::deadline {
        sweeper(net::asio::io_context& io, parking_lot& owner) : deadline(io), lot(owner) {}
        void fire() override;
        parking_lot& lot;
    };
    void watch();
    void ready();
    void sweep();

    net::asio::io_context& io_;
    int epfd_ = -1;
    net::asio::posix::stream_descriptor epoll_;
    bool watching_ = false;
    std::vector<std::unique_ptr<slot[]>> blocks_;
    std::uint32_t capacity_ = 0, used_ = 0;  ///< slots in blocks_; slots ever handed out
    std::uint32_t free_head_ = UINT32_MAX;
    std::size_t count_ = 0;
    std::vector<std::string> names_;  ///< listening addresses and listener names, interned
    sweeper sweeper_;
};

}  // namespace dmz::proxy
