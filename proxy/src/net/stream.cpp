// TLS on the socket itself: OpenSSL reads and writes the descriptor (non-blocking), and
// the coroutine waits for readiness whenever OpenSSL says it wants to read or write.
#include <openssl/err.h>
#include <openssl/ssl.h>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <stdexcept>

#include <boost/asio/post.hpp>

#include "asio.hpp"

namespace dmz::net {

const char* to_string(op_kind k) {
    switch (k) {
    case op_kind::read: return "read";
    case op_kind::write: return "write";
    case op_kind::connect: return "connect";
    case op_kind::handshake: return "handshake";
    }
    return "?";
}

task<std::size_t> stream::fail(op_kind k, error_code& ec) {
    // As a connection that broke now: the peer sees it close, later operations fail too.
    error_code ignored;
    plain_.shutdown(tcp::socket::shutdown_both, ignored);
    co_await asio::post(plain_.get_executor(), use_task);
    if (k == op_kind::read) ec = faults_->eof ? error_code(asio::error::eof) : error_code(asio::error::connection_reset);
    else if (k == op_kind::write) ec = asio::error::broken_pipe;
    else if (k == op_kind::connect) ec = asio::error::connection_refused;
    else ec = ssl::error::stream_truncated;
    co_return 0;
}

void stream::ssl_free::operator()(SSL* s) const { SSL_free(s); }

void stream::attach(ssl::context& ctx) {
    ssl_.reset(SSL_new(ctx.native_handle()));
    if (!ssl_) throw std::runtime_error("SSL_new failed");
    SSL_set_mode(ssl_.get(), SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS);
    // A record in one recv (what has arrived, up to a record buffer), not its 5-byte header
    // and then its body in two. Bytes read ahead are seen by SSL_has_pending.
    SSL_set_read_ahead(ssl_.get(), 1);
}

task<int> stream::tls_call(int (*fn)(SSL*, void*, int), void* p, int n, error_code& ec) {
    while (true) {
        ERR_clear_error();
        errno = 0;
        int r = fn(ssl_.get(), p, n);
        if (r > 0) co_return r;
        int e = SSL_get_error(ssl_.get(), r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            if (e == SSL_ERROR_WANT_READ) {
                co_await plain_.async_receive(asio::buffer(&peek_, 1), tcp::socket::message_peek, redirect(ec));
                if (ec == asio::error::eof) ec = {};  // OpenSSL sees the end itself (close_notify or not)
            } else
                co_await plain_.async_wait(tcp::socket::wait_write, redirect(ec));
            if (ec) co_return 0;
            continue;
        }
        if (e == SSL_ERROR_ZERO_RETURN) {
            ec = asio::error::eof;  // close_notify
        } else if (e == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) {
            // The peer closed without close_notify (or the socket failed).
            ec = errno ? error_code(errno, asio::error::get_system_category()) : error_code(ssl::error::stream_truncated);
        } else {
            ec = error_code(static_cast<int>(ERR_get_error()), asio::error::get_ssl_category());
        }
        co_return 0;
    }
}

task<void> stream::handshake(bool server, error_code& ec) {
    if (fails(op_kind::handshake)) {
        co_await fail(op_kind::handshake, ec);
        co_return;
    }
    plain_.non_blocking(true, ec);
    if (ec) co_return;
    if (SSL_set_fd(ssl_.get(), static_cast<int>(plain_.native_handle())) != 1) {
        ec = error_code(static_cast<int>(ERR_get_error()), asio::error::get_ssl_category());
        co_return;
    }
    if (server) SSL_set_accept_state(ssl_.get());
    else SSL_set_connect_state(ssl_.get());
    co_await tls_call([](SSL* s, void*, int) { return SSL_do_handshake(s); }, nullptr, 0, ec);
}

task<std::size_t> stream::tls_read(asio::mutable_buffer b, error_code& ec) {
    if (b.size() == 0) co_return 0;
    int n = co_await tls_call([](SSL* s, void* p, int len) { return SSL_read(s, p, len); }, b.data(),
                              static_cast<int>(std::min<std::size_t>(b.size(), INT_MAX)), ec);
    co_return static_cast<std::size_t>(n);
}

task<std::size_t> stream::tls_write(asio::const_buffer b, error_code& ec) {
    std::size_t done = 0;
    while (done < b.size() && !ec) {
        auto* p = const_cast<char*>(static_cast<const char*>(b.data())) + done;
        int n = co_await tls_call([](SSL* s, void* q, int len) { return SSL_write(s, q, len); }, p,
                                  static_cast<int>(std::min<std::size_t>(b.size() - done, INT_MAX)), ec);
        done += static_cast<std::size_t>(n);
    }
    co_return done;
}

deadline::deadline(asio::io_context& io) : owner_(asio::use_service<deadlines>(io)) {}

void deadline::arm_at(clock::time_point t) {
    at_ = t;
    if (!linked_) owner_.link(*this);
}

void deadline::disarm() {
    if (linked_) owner_.unlink(*this);
}

deadlines::deadlines(asio::execution_context& ctx)
    : asio::execution_context::service(ctx), timer_(static_cast<asio::io_context&>(ctx)) {}

void deadlines::shutdown() {
    shut_ = true;
    timer_.cancel();
}

void deadlines::link(deadline& d) {
    d.prev_ = nullptr;
    d.next_ = head_;
    if (head_) head_->prev_ = &d;
    head_ = &d;
    d.linked_ = true;
    if (!ticking_ && !shut_) {
        ticking_ = true;
        timer_.expires_after(tick_period);
        timer_.async_wait([this](const error_code& ec) { tick(ec); });
    }
}

void deadlines::unlink(deadline& d) {
    if (d.prev_) d.prev_->next_ = d.next_;
    else head_ = d.next_;
    if (d.next_) d.next_->prev_ = d.prev_;
    d.prev_ = d.next_ = nullptr;
    d.linked_ = false;
}

void deadlines::tick(const error_code& ec) {
    ticking_ = false;
    if (ec || shut_) return;
    auto now = deadline::clock::now();
    for (deadline* d = head_; d;) {
        deadline* next = d->next_;
        if (d->at_ <= now) {
            unlink(*d);
            d->fire();
        }
        d = next;
    }
    if (head_) {
        ticking_ = true;
        timer_.expires_at(now + tick_period);
        timer_.async_wait([this](const error_code& e) { tick(e); });
    }
}

}  // namespace dmz::net
