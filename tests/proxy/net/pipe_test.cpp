// The one raw byte pipe over real loopback sockets: known lengths through the buffer and
// through a kernel pipe, what follows a body staying unread, copies until the end, and a
// source that ends early.
#include <gtest/gtest.h>

#include <chrono>
#include <string>

#include "net/pipe.hpp"

namespace net = dmz::net;
namespace asio = net::asio;
using net::error_code;
using net::task;
using net::tcp;

namespace {

/// Two connected loopback sockets.
struct socket_pair {
    tcp::socket a, b;
    explicit socket_pair(asio::io_context& io) : a(io), b(io) {
        tcp::acceptor acc(io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
        a.connect(acc.local_endpoint());
        b = acc.accept();
    }
};

std::string pattern(std::size_t n) {
    std::string s(n, '\0');
    for (std::size_t i = 0; i < n; ++i) s[i] = static_cast<char>('a' + (i * 7 + i / 251) % 26);
    return s;
}

/// Copies from the `from` side of one pair to the `to` side of another: a peer writes `sent`
/// (optionally preceded by `pending` already read), a reader collects what arrives.
struct run_result {
    bool ok = false;
    error_code ec;
    std::string received;
    std::string left_pending;
    std::uint64_t moved = 0;
    int reads = 0;
};

run_result copy(const std::string& pending, const std::string& sent, std::uint64_t left, bool close_after) {
    asio::io_context io(1);
    socket_pair src(io), dst(io);
    net::stream from(std::move(src.b)), to(std::move(dst.a));
    run_result r;
    dmz::proxy::flat_buffer buf(4096);
    std::size_t room = 0;
    char* p = buf.prepare(pending.size(), room);
    std::copy(pending.begin(), pending.end(), p);
    buf.commit(pending.size());
    asio::co_spawn(io, [&]() -> task<> {
        net::pipe_leg leg{.from = from, .to = to, .pending = buf, .left = left, .moved = r.moved,
                          .before_read = [&] { ++r.reads; }};
        r.ok = co_await net::pipe(leg, r.ec);
        r.left_pending = std::string(buf.data());
        to.shutdown_send();
    }, asio::detached);
    asio::co_spawn(io, [&]() -> task<> {
        error_code ec;
        co_await asio::async_write(src.a, asio::buffer(sent), asio::redirect_error(net::use_task, ec));
        if (close_after) src.a.shutdown(tcp::socket::shutdown_send, ec);
    }, asio::detached);
    asio::co_spawn(io, [&]() -> task<> {
        char tmp[65536];
        while (true) {
            error_code ec;
            auto n = co_await dst.b.async_read_some(asio::buffer(tmp), asio::redirect_error(net::use_task, ec));
            if (ec) break;
            r.received.append(tmp, n);
        }
    }, asio::detached);
    io.run_for(std::chrono::seconds(20));
    EXPECT_TRUE(io.stopped()) << "the copy did not finish";
    return r;
}

}  // namespace

TEST(NetPipe, ShortKnownLengthLeavesWhatFollowsPending) {
    auto body = pattern(1000);
    auto r = copy("", body + "NEXT", 1000, false);
    EXPECT_TRUE(r.ok) << r.ec.message();
    EXPECT_EQ(r.received, body);
    EXPECT_EQ(r.moved, 1000u);
    EXPECT_EQ(r.left_pending, "NEXT");  // read with the body, not forwarded
}

TEST(NetPipe, PendingBytesGoFirst) {
    auto body = pattern(5000);
    auto r = copy(body.substr(0, 1200), body.substr(1200), 5000, false);
    EXPECT_TRUE(r.ok);
    EXPECT_EQ(r.received, body);
    EXPECT_EQ(r.moved, 5000u);
}

TEST(NetPipe, LongKnownLengthSplicesExactlyAndLeavesTheRestInTheSocket) {
    auto body = pattern(3 * 1024 * 1024 + 17);  // beyond splice_min: a kernel pipe
    auto r = copy(body.substr(0, 100), body.substr(100) + "TRAILING", body.size(), false);
    EXPECT_TRUE(r.ok) << r.ec.message();
    EXPECT_EQ(r.received.size(), body.size());
    EXPECT_TRUE(r.received == body);
    EXPECT_EQ(r.moved, body.size());
    EXPECT_EQ(r.left_pending, "");  // the splice never read past the body
    EXPECT_GT(r.reads, 0);          // the read deadline was armed before waits
}

TEST(NetPipe, UntilEofCopiesEverythingAndEndsCleanly) {
    auto all = pattern(700 * 1024);
    auto r = copy("hello ", all, net::until_eof, true);
    EXPECT_TRUE(r.ok) << r.ec.message();
    EXPECT_EQ(r.received.size(), all.size() + 6);
    EXPECT_TRUE(r.received == "hello " + all);
}

TEST(NetPipe, SourceEndingEarlyIsAFailureWithWhatCameForwarded) {
    auto part = pattern(400 * 1024);
    auto r = copy("", part, 1024 * 1024, true);
    EXPECT_FALSE(r.ok);
    EXPECT_EQ(r.ec, asio::error::eof);
    EXPECT_EQ(r.received.size(), part.size());
    EXPECT_EQ(r.moved, part.size());
}
