// The one raw byte pipe (see pipe.hpp).
#include "net/pipe.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace dmz::net {

namespace {

constexpr std::size_t read_chunk = 64 * 1024;

/// A kernel pipe for splice(2): socket -> pipe -> socket, never through this process's memory.
class splice_pipe {
public:
    splice_pipe();
    ~splice_pipe();
    splice_pipe(const splice_pipe&) = delete;
    splice_pipe& operator=(const splice_pipe&) = delete;
    bool ok() const { return fd_[0] >= 0; }
    std::size_t capacity() const { return cap_; }
    /// Moves what `from` has (at least one byte, at most `max`, waiting for it) into the pipe.
    /// The pipe must be empty. Returns the count, or 0 with `ec` set (eof included).
    task<std::size_t> fill(stream& from, std::size_t max, error_code& ec);
    /// Moves the pipe's `n` bytes to `to`, waiting while its send buffer is full.
    task<void> drain(stream& to, std::size_t n, error_code& ec);

private:
    int fd_[2] = {-1, -1};
    std::size_t cap_ = 64 * 1024;
};

splice_pipe::splice_pipe() {
    if (::pipe2(fd_, O_CLOEXEC | O_NONBLOCK) != 0) {
        fd_[0] = fd_[1] = -1;
        return;
    }
    // A larger pipe moves more per system call (the kernel caps it at fs.pipe-max-size).
    int got = ::fcntl(fd_[1], F_SETPIPE_SZ, 1 << 20);
    if (got > 0) cap_ = static_cast<std::size_t>(got);
}

splice_pipe::~splice_pipe() {
    for (int fd : fd_)
        if (fd >= 0) ::close(fd);
}

task<std::size_t> splice_pipe::fill(stream& from, std::size_t max, error_code& ec) {
    if (from.fails(op_kind::read)) co_return co_await from.fail(op_kind::read, ec);
    int fd = static_cast<int>(from.socket().native_handle());
    if (!from.socket().native_non_blocking()) from.socket().native_non_blocking(true, ec);
    if (ec) co_return 0;
    while (true) {
        auto r = ::splice(fd, nullptr, fd_[1], nullptr, std::min(max, cap_), SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (r > 0) co_return static_cast<std::size_t>(r);
        if (r == 0) {
            ec = asio::error::eof;
            co_return 0;
        }
        if (errno == EINTR) continue;
        if (errno != EAGAIN) {
            ec = error_code(errno, asio::error::get_system_category());
            co_return 0;
        }
        // The pipe is empty, so the socket has nothing yet: wait for it.
        co_await from.wait_readable(ec);
        if (ec) co_return 0;
    }
}

task<void> splice_pipe::drain(stream& to, std::size_t n, error_code& ec) {
    if (to.fails(op_kind::write)) {
        co_await to.fail(op_kind::write, ec);
        co_return;
    }
    int fd = static_cast<int>(to.socket().native_handle());
    if (!to.socket().native_non_blocking()) to.socket().native_non_blocking(true, ec);
    if (ec) co_return;
    while (n > 0) {
        auto r = ::splice(fd_[0], nullptr, fd, nullptr, n, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (r > 0) {
            n -= static_cast<std::size_t>(r);
            continue;
        }
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == EAGAIN) {
            co_await to.socket().async_wait(tcp::socket::wait_write, redirect(ec));
            if (ec) co_return;
            continue;
        }
        ec = r == 0 ? error_code(asio::error::broken_pipe) : error_code(errno, asio::error::get_system_category());
        co_return;
    }
}

/// Writes what is pending (up to `left`) to `to`.
task<bool> write_pending(pipe_leg& leg, error_code& ec) {
    auto data = leg.pending.data();
    if (leg.left != until_eof && data.size() > leg.left) data = data.substr(0, static_cast<std::size_t>(leg.left));
    co_await leg.to.write(asio::buffer(data.data(), data.size()), ec);
    if (ec) {
        leg.to_failed = true;
        co_return false;
    }
    leg.moved += data.size();
    leg.pending.consume(data.size());
    if (leg.left != until_eof) leg.left -= data.size();
    co_return true;
}

task<bool> read_more(pipe_leg& leg, error_code& ec) {
    std::size_t room = 0;
    char* p = leg.pending.prepare(read_chunk, room);
    if (leg.before_read) leg.before_read();
    auto n = co_await leg.from.read_some(asio::buffer(p, std::min(room, read_chunk)), ec);
    if (ec) co_return false;
    leg.pending.commit(n);
    co_return true;
}

bool spliceable(const pipe_leg& leg) {
    if (leg.from.is_tls() || leg.to.is_tls()) return false;
    return leg.left == until_eof || leg.left > leg.pending.size() + splice_min;
}

/// The rest through a kernel pipe. True when done, or when no pipe could be opened (the
/// buffer then carries on); false with `ec` set.
task<bool> splice_rest(pipe_leg& leg, error_code& ec) {
    splice_pipe kp;
    if (!kp.ok()) co_return true;
    leg.pending.release();
    while (leg.left > 0) {
        if (leg.before_read) leg.before_read();
        auto want = static_cast<std::size_t>(std::min<std::uint64_t>(leg.left, kp.capacity()));
        auto n = co_await kp.fill(leg.from, want, ec);
        if (ec) co_return false;
        co_await kp.drain(leg.to, n, ec);
        if (ec) {
            leg.to_failed = true;
            co_return false;
        }
        leg.moved += n;
        if (leg.left != until_eof) leg.left -= n;
    }
    co_return true;
}

}  // namespace

task<bool> pipe(pipe_leg& leg, error_code& ec) {
    bool splice = spliceable(leg);
    while (leg.left > 0) {
        if (!leg.pending.empty()) {
            if (!co_await write_pending(leg, ec)) co_return false;
        } else if (splice) {
            splice = false;
            if (!co_await splice_rest(leg, ec)) break;
        } else if (!co_await read_more(leg, ec)) {
            break;
        }
    }
    if (leg.left == 0) co_return true;
    co_return leg.left == until_eof && ec == asio::error::eof;
}

}  // namespace dmz::net
