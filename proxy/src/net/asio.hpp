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
class stream {
public:
    explicit stream(tcp::socket s) : plain_(std::move(s)) {}
    stream(tcp::socket s, ssl::context& ctx)
        : plain_(s.get_executor()), tls_(std::make_unique<ssl::stream<tcp::socket>>(std::move(s), ctx)) {}

    bool is_tls() const { return tls_ != nullptr; }
    /// STARTTLS: the same connection continues under TLS (the handshake is the caller's).
    void start_tls(ssl::context& ctx) { tls_ = std::make_unique<ssl::stream<tcp::socket>>(std::move(plain_), ctx); }
    tcp::socket& socket() { return tls_ ? tls_->next_layer() : plain_; }
    ssl::stream<tcp::socket>* tls() { return tls_.get(); }
    SSL* native_tls() { return tls_ ? tls_->native_handle() : nullptr; }

    task<std::size_t> read_some(asio::mutable_buffer b, error_code& ec) {
        if (tls_) co_return co_await tls_->async_read_some(b, redirect(ec));
        co_return co_await plain_.async_read_some(b, redirect(ec));
    }
    /// Waits until the peer has sent something, holding no buffer meanwhile (an idle
    /// keep-alive connection then costs no buffer). Plain streams only: a TLS stream may
    /// hold bytes already read, which readiness of the socket would not show.
    task<void> wait_readable(error_code& ec) {
        co_await plain_.async_wait(tcp::socket::wait_read, redirect(ec));
    }
    template <class Buffers>
    task<std::size_t> write(const Buffers& b, error_code& ec) {
        if (tls_) co_return co_await asio::async_write(*tls_, b, redirect(ec));
        co_return co_await asio::async_write(plain_, b, redirect(ec));
    }
    /// Cancels pending operations (a deadline fired).
    void cancel() {
        error_code ec;
        socket().cancel(ec);
    }
    void close() {
        error_code ec;
        socket().shutdown(tcp::socket::shutdown_both, ec);
        socket().close(ec);
    }
    /// Half-close the write side (plain streams only; TLS sends close_notify on shutdown).
    void shutdown_send() {
        error_code ec;
        socket().shutdown(tcp::socket::shutdown_send, ec);
    }

private:
    tcp::socket plain_;
    std::unique_ptr<ssl::stream<tcp::socket>> tls_;
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
