#pragma once
// The Asio include for runtime sources only (never from a public header).
#include <vector>
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

#include "net/fault_plan.hpp"

namespace dmz::net {

namespace asio = boost::asio;
namespace ssl = boost::asio::ssl;
using tcp = asio::ip::tcp;
using error_code = boost::system::error_code;
/// Coroutines run on a worker's io_context: bound to its concrete executor type, not to
/// the type-erased any_io_executor, every resumption skips a virtual dispatch.
using executor = asio::io_context::executor_type;
template <class T = void>
using task = asio::awaitable<T, executor>;
inline constexpr asio::use_awaitable_t<executor> use_task{};

inline auto redirect(error_code& ec) { return asio::redirect_error(use_task, ec); }

/// A connection, plain or TLS: one code path for both (CONVENTIONS 3).
///
/// TLS runs OpenSSL directly on the socket (SSL_set_fd, non-blocking, waiting for
/// readiness on WANT_READ/WANT_WRITE) rather than through asio::ssl::stream, whose two
/// 17 KiB record buffers and 17 KiB BIO pair live as long as the connection: here an idle
/// TLS connection keeps only OpenSSL's session state (SSL_MODE_RELEASE_BUFFERS).
class stream {
    struct ssl_free {
        void operator()(SSL* s) const;
    };

public:
    using tls_handle = std::unique_ptr<SSL, ssl_free>;
    explicit stream(tcp::socket s) : plain_(std::move(s)) {}
    stream(tcp::socket s, ssl::context& ctx) : plain_(std::move(s)) { attach(ctx); }
    /// A connection whose TLS session was set up before (a parked connection waking up).
    stream(tcp::socket s, tls_handle tls) : plain_(std::move(s)), ssl_(std::move(tls)) {}

    bool is_tls() const { return ssl_ != nullptr; }
    /// STARTTLS: the same connection continues under TLS (the handshake is the caller's).
    void start_tls(ssl::context& ctx) { attach(ctx); }
    tcp::socket& socket() { return plain_; }
    SSL* native_tls() { return ssl_.get(); }
    /// Hands the TLS state over (to park the connection); the stream is plain afterwards.
    tls_handle release_tls() { return std::move(ssl_); }
    /// The worker's fault plan (tests only; null in production), shared with the streams a
    /// session opens upstream.
    void set_faults(fault_plan* p) { faults_ = p; }
    fault_plan* faults() const { return faults_; }
    /// Whether the plan fails this operation (counting it).
    bool fails(op_kind k) { return faults_ && faults_->due(k); }
    /// The failed operation: the socket shut down, the plan's error after a post.
    task<std::size_t> fail(op_kind k, error_code& ec);

    /// The TLS handshake, as server or client (the socket must be connected).
    task<void> handshake(bool server, error_code& ec);

    // read_some, wait_readable and write are not coroutines themselves: each hands back the
    // operation's own awaitable, which saves a coroutine frame (a malloc) per operation.
    task<std::size_t> read_some(asio::mutable_buffer b, error_code& ec) {
        if (fails(op_kind::read)) [[unlikely]] return fail(op_kind::read, ec);
        if (ssl_) return tls_read(b, ec);
        return plain_.async_read_some(b, redirect(ec));
    }
    /// Waits until the peer has sent something, holding no buffer meanwhile (an idle
    /// keep-alive connection then costs no buffer). Returns at once when OpenSSL already
    /// holds bytes the socket's readiness would not show.
    ///
    /// A one-byte MSG_PEEK receive, not async_wait: Boost 1.74's reactor re-arms the
    /// descriptor with epoll_ctl on every async_wait, while a receive after a drained read
    /// is queued with no system call (the descriptor stays registered edge-triggered).
    /// (The count it returns means nothing.)
    task<std::size_t> wait_readable(error_code& ec) {
        if (fails(op_kind::read)) [[unlikely]] return fail(op_kind::read, ec);
        if (ssl_ && SSL_has_pending(ssl_.get())) return ready();
        return peek(ec);
    }
    /// Writes all of `b`. A plain connection first tries one non-blocking send: most writes
    /// fit the socket's buffer, and the coroutine then goes on at once. (Asio would post
    /// the completion of a send that succeeded at once, and its loop would make an extra
    /// epoll_wait before running it.) What does not fit is written asynchronously.
    template <class Buffers>
    task<std::size_t> write(const Buffers& b, error_code& ec) {
        if (fails(op_kind::write)) [[unlikely]] return fail(op_kind::write, ec);
        if (ssl_) return tls_gather(b, ec);
        if (!plain_.non_blocking()) plain_.non_blocking(true, ec);
        std::size_t n = ec ? 0 : plain_.write_some(b, ec);
        if (ec == asio::error::would_block || ec == asio::error::try_again) ec = {}, n = 0;
        if (ec || n == asio::buffer_size(b)) return done(n);
        return write_rest(b, n, ec);
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
    template <class Buffers>
    task<std::size_t> tls_gather(Buffers b, error_code& ec) {
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
    task<std::size_t> peek(error_code& ec) {
        return plain_.async_receive(asio::buffer(&peek_, 1), tcp::socket::message_peek, redirect(ec));
    }
    static task<std::size_t> ready() { co_return 0; }
    static task<std::size_t> done(std::size_t n) { co_return n; }
    /// The rest of a write after the first `sent` bytes went in one send.
    template <class Buffers>
    task<std::size_t> write_rest(Buffers b, std::size_t sent, error_code& ec) {
        std::vector<asio::const_buffer> rest;
        std::size_t skip = sent;
        for (auto it = asio::buffer_sequence_begin(b); it != asio::buffer_sequence_end(b); ++it) {
            asio::const_buffer x(*it);
            if (skip >= x.size()) {
                skip -= x.size();
                continue;
            }
            rest.push_back(x + skip);
            skip = 0;
        }
        std::size_t n = co_await asio::async_write(plain_, rest, redirect(ec));
        co_return sent + n;
    }
    void attach(ssl::context& ctx);
    task<std::size_t> tls_read(asio::mutable_buffer b, error_code& ec);
    task<std::size_t> tls_write(asio::const_buffer b, error_code& ec);
    /// One OpenSSL call, repeated after waiting for the socket while it wants to read or
    /// write. Returns its positive result, or 0 with `ec` set.
    task<int> tls_call(int (*fn)(SSL*, void*, int), void* p, int n, error_code& ec);
    tcp::socket plain_;
    tls_handle ssl_;
    fault_plan* faults_ = nullptr;
    char peek_ = 0;
};

class deadlines;

/// A deadline of one io_context. Every deadline of a worker is checked by one coarse ticker
/// (deadlines::tick), so arming, moving or dropping a deadline is a store and a list link,
/// never a timer operation or a coroutine: a request's timeouts cost nothing unless they
/// fire. A deadline fires at most one tick late.
class deadline {
public:
    using clock = std::chrono::steady_clock;
    explicit deadline(asio::io_context& io);
    virtual ~deadline() { disarm(); }
    deadline(const deadline&) = delete;
    deadline& operator=(const deadline&) = delete;

    void arm(std::chrono::milliseconds d) { arm_at(clock::now() + d); }
    void arm_at(clock::time_point t);
    void disarm();
    bool armed() const { return linked_; }

protected:
    /// Runs inside the ticker, once per arm: it may post work, never destroy a deadline.
    virtual void fire() = 0;

private:
    friend class deadlines;
    deadlines& owner_;
    deadline* prev_ = nullptr;
    deadline* next_ = nullptr;
    bool linked_ = false;
    clock::time_point at_{};
};

/// The deadlines of one io_context (an Asio service, one per worker) and their ticker, which
/// runs only while some deadline is armed.
class deadlines : public asio::execution_context::service {
public:
    static inline asio::execution_context::id id;
    static constexpr std::chrono::milliseconds tick_period{50};
    explicit deadlines(asio::execution_context& ctx);

private:
    friend class deadline;
    void shutdown() override;
    void link(deadline& d);
    void unlink(deadline& d);
    void tick(const error_code& ec);
    asio::steady_timer timer_;
    deadline* head_ = nullptr;
    bool ticking_ = false, shut_ = false;
};

/// Cancels a stream's operations when its deadline passes; `expired()` then says so.
class watchdog final : public deadline {
public:
    watchdog(asio::io_context& io, stream& s) : deadline(io), target_(&s) {}
    void arm(std::chrono::milliseconds d) {
        if (stopped_) return;
        expired_ = false;
        deadline::arm(d);
    }
    bool expired() const { return expired_; }
    /// For good: later arms are ignored.
    void stop() {
        stopped_ = true;
        disarm();
    }

private:
    void fire() override {
        expired_ = true;
        target_->cancel();
    }
    stream* target_;
    bool expired_ = false, stopped_ = false;
};

}  // namespace dmz::net
