#pragma once
// The Asio include for runtime sources only (never from a public header).
#include <utility>  // before any Asio header with GCC 12 (awaitable.hpp)

#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ip/v6_only.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

namespace dmz::net {

namespace asio = boost::asio;
namespace ssl = boost::asio::ssl;
using tcp = asio::ip::tcp;
using error_code = boost::system::error_code;
template <class T = void>
using task = asio::awaitable<T>;

inline auto redirect(error_code& ec) { return asio::redirect_error(asio::use_awaitable, ec); }

/// A connection, plain or TLS: one code path for both (CONVENTIONS 3).
///
/// TLS runs OpenSSL directly on the socket (SSL_set_fd, non-blocking, waiting for
/// readiness on WANT_READ/WANT_WRITE) rather than through asio::ssl::stream, whose two
/// 17 KiB record buffers and 17 KiB BIO pair live as long as the connection: here an idle
/// TLS connection keeps only OpenSSL's session state (SSL_MODE_RELEASE_BUFFERS).
class stream {
public:
    explicit stream(tcp::socket s) : plain_(std::move(s)) {}
    stream(tcp::socket s, ssl::context& ctx) : plain_(std::move(s)) { attach(ctx); }

    bool is_tls() const { return ssl_ != nullptr; }
    /// STARTTLS: the same connection continues under TLS (the handshake is the caller's).
    void start_tls(ssl::context& ctx) { attach(ctx); }
    tcp::socket& socket() { return plain_; }
    SSL* native_tls() { return ssl_.get(); }

    /// The TLS handshake, as server or client (the socket must be connected).
    task<void> handshake(bool server, error_code& ec);

    task<std::size_t> read_some(asio::mutable_buffer b, error_code& ec) {
        if (ssl_) co_return co_await tls_read(b, ec);
        co_return co_await plain_.async_read_some(b, redirect(ec));
    }
    /// Waits until the peer has sent something, holding no buffer meanwhile (an idle
    /// keep-alive connection then costs no buffer). Returns at once when OpenSSL already
    /// holds bytes the socket's readiness would not show.
    task<void> wait_readable(error_code& ec) {
        if (ssl_ && SSL_has_pending(ssl_.get())) co_return;
        co_await plain_.async_wait(tcp::socket::wait_read, redirect(ec));
    }
    template <class Buffers>
    task<std::size_t> write(const Buffers& b, error_code& ec) {
        if (!ssl_) co_return co_await asio::async_write(plain_, b, redirect(ec));
        // Small gathers (a head and a short body) become one TLS record and one send.
        std::size_t total = asio::buffer_size(b), done = 0;
        auto first = asio::buffer_sequence_begin(b), last = asio::buffer_sequence_end(b);
        if (total <= 16 * 1024 && std::distance(first, last) > 1) {
            std::string one(total, '\0');
            asio::buffer_copy(asio::buffer(one), b);
            co_return co_await tls_write(asio::const_buffer(one.data(), one.size()), ec);
        }
        for (auto it = first; it != last && !ec; ++it) done += co_await tls_write(asio::const_buffer(*it), ec);
        co_return done;
    }
    /// Cancels pending operations (a deadline fired).
    void cancel() {
        error_code ec;
        plain_.cancel(ec);
    }
    void close() {
        error_code ec;
        plain_.shutdown(tcp::socket::shutdown_both, ec);
        plain_.close(ec);
    }
    /// Half-close the write side.
    void shutdown_send() {
        error_code ec;
        plain_.shutdown(tcp::socket::shutdown_send, ec);
    }

private:
    void attach(ssl::context& ctx);
    task<std::size_t> tls_read(asio::mutable_buffer b, error_code& ec);
    task<std::size_t> tls_write(asio::const_buffer b, error_code& ec);
    /// One OpenSSL call, repeated after waiting for the socket while it wants to read or
    /// write. Returns its positive result, or 0 with `ec` set.
    task<int> tls_call(int (*fn)(SSL*, void*, int), void* p, int n, error_code& ec);
    struct ssl_free {
        void operator()(SSL* s) const;
    };
    tcp::socket plain_;
    std::unique_ptr<SSL, ssl_free> ssl_;
};

/// Cancels a stream's operations when its deadline passes. One timer per direction, re-armed
/// by moving the deadline (a store), not by a timer operation per read. The timer loop owns
/// its state, so the watchdog may be destroyed while the loop still waits.
class watchdog {
public:
    using clock = std::chrono::steady_clock;
    watchdog(asio::any_io_executor ex, stream& s) : st_(std::make_shared<state>(ex, &s)) {}
    ~watchdog() { stop(); }
    watchdog(const watchdog&) = delete;
    watchdog& operator=(const watchdog&) = delete;

    void arm(std::chrono::milliseconds d) {
        st_->deadline = clock::now() + d;
        st_->expired = false;
        if (!st_->running) {
            st_->running = true;
            asio::co_spawn(st_->timer.get_executor(), run(st_), asio::detached);
        } else if (st_->deadline < st_->timer.expiry()) {
            st_->timer.cancel();
        }
    }
    void disarm() { st_->deadline = clock::time_point::max(); }
    bool expired() const { return st_->expired; }
    void stop() {
        st_->target = nullptr;
        st_->timer.cancel();
    }

private:
    struct state {
        state(asio::any_io_executor ex, stream* s) : timer(ex), target(s) {}
        asio::steady_timer timer;
        stream* target;
        clock::time_point deadline = clock::time_point::max();
        bool expired = false, running = false;
    };
    static task<> run(std::shared_ptr<state> st) {
        while (st->target) {
            st->timer.expires_at(st->deadline);
            error_code ec;
            co_await st->timer.async_wait(redirect(ec));
            if (!st->target) break;
            if (clock::now() >= st->deadline) {
                st->expired = true;
                st->deadline = clock::time_point::max();
                st->target->cancel();
            }
        }
        st->running = false;
    }
    std::shared_ptr<state> st_;
};

}  // namespace dmz::net
