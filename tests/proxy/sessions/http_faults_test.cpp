// An HTTP session inside the test (plain and TLS on both sides): a POST with a body relayed
// to a fake upstream, once as it goes, then again for every n with the n-th read, write,
// upstream connect or TLS handshake failing, until a run has no n-th operation of that kind.
// Every run must end (no hang), leave no session, connection or descriptor behind, log
// what the README promises, and tell the client a clean story.
#include <iostream>

#include "proxy/sessions/rig.hpp"

namespace dmz::test::sessions {
namespace {

using json = nlohmann::json;

const std::string request_text =
    "POST /ews/exchange.asmx HTTP/1.1\r\nHost: mail.contoso.com\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
const std::string response_text = "HTTP/1.1 200 OK\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world";

std::string http_config(bool tls) {
    std::string c = R"([instance]
name = "front-end"

[listeners.web]
bind = ["127.0.0.1:{FRONT}"]
timeouts = { head = "5s", idle = "5s" }
)";
    c += tls ? "protocol = \"https\"\ncertificates = [{ names = [\"mail.contoso.com\"], cert = \"{CERT}\", key = \"{KEY}\" }]\n"
             : "protocol = \"http\"\n";
    c += R"(
[[rules]]
name = "Origin"
action = "allow"
)";
    c += tls ? "target = { address = \"127.0.0.1\", port = {ORIGIN}, tls = true, name = \"mail.contoso.com\", ca_file = \"{CA}\", "
               "timeouts = { connect = \"5s\", read = \"5s\" } }\n"
             : "target = { address = \"127.0.0.1\", port = {ORIGIN}, timeouts = { connect = \"5s\", read = \"5s\" } }\n";
    return c;
}

struct outcome : aftermath {
    bool ended = false;      ///< the worker ran out of work in time
    std::string client_got;  ///< every byte the client read before the end
    std::string origin_got;  ///< every byte the upstream read
    bool origin_answered = false;
    int http_left = 0;  ///< HTTP sessions still alive
    int fds_before = 0, fds_after = 0;
};

/// The upstream: one connection, the request head and its 5-byte body, the answer, close.
task<> origin(rig& r, bool tls, ssl::context& ctx, outcome& out) {
    tcp::socket s(r.worker().io);
    error_code ec;
    co_await r.origin().async_accept(s, net::redirect(ec));
    if (ec) co_return;
    peer p(std::move(s));
    bool ok = true;
    if (tls) ok = co_await p.handshake(ctx, ssl::stream_base::server);
    if (ok) ok = co_await p.read_until("\r\n\r\n");
    while (ok && p.in.size() < p.in.find("\r\n\r\n") + 4 + 5) ok = co_await p.read_more();
    if (ok) out.origin_answered = co_await p.write(response_text);
    out.origin_got = p.in;
    p.close();
}

/// The client: connect, the request, everything until the end; then no more connections.
task<> client(rig& r, bool tls, ssl::context& ctx, outcome& out) {
    tcp::socket s(r.worker().io);
    error_code ec;
    co_await s.async_connect(r.front(), net::redirect(ec));
    peer p(std::move(s));
    bool ok = !ec;
    if (ok && tls) ok = co_await p.handshake(ctx, ssl::stream_base::client);
    if (ok) ok = co_await p.write(request_text);
    if (ok) co_await p.read_to_end();
    out.client_got = p.in;
    p.close();
    r.close_acceptors();
}

outcome run_http(bool tls, net::fault_plan* plan) {
    outcome out;
    out.fds_before = open_fds();
    {
        auto sctx = server_context();
        auto cctx = client_context();
        rig r(http_config(tls));
        r.worker().faults = plan;
        r.serve_one();
        r.spawn([&]() { return origin(r, tls, sctx, out); });
        r.spawn([&]() { return client(r, tls, cctx, out); });
        out.ended = r.run();
        static_cast<aftermath&>(out) = collect(r);
        out.http_left = proxy::http_sessions().load();
    }
    out.fds_after = open_fds();
    return out;
}

std::string describe(const outcome& o) {
    std::string s = "client got: " + o.client_got.substr(0, 400) + "\norigin got: " + o.origin_got.substr(0, 300) + "\nrecords:\n";
    for (auto& r : o.recs) s += r.dump() + "\n";
    return s + o.peer_errors;
}

/// What holds after every run, failed or not.
void expect_clean(const outcome& o, const std::string& what) {
    EXPECT_TRUE(o.ended) << what << ": the worker still had work after 10 s (a hang)\n" << describe(o);
    EXPECT_EQ(o.http_left, 0) << what << ": a session outlived its connection";
    EXPECT_EQ(o.open_connections, 0) << what << ": the open-connection gauge did not return to 0";
    EXPECT_EQ(o.internal_faults, 0u) << what << ": an exception escaped";
    EXPECT_EQ(o.fds_after, o.fds_before) << what << ": descriptors leaked";
    EXPECT_EQ(o.peer_errors, "") << what;
}

void expect_success(const outcome& o, const std::string& what) {
    ASSERT_EQ(o.recs.size(), 1u) << what << "\n" << describe(o);
    auto& rec = o.recs.front();
    EXPECT_EQ(rec["status"], 200) << what;
    EXPECT_EQ(rec["fault"], "") << what << "\n" << describe(o);
    EXPECT_EQ(o.client_got.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << what << "\n" << describe(o);
    EXPECT_TRUE(o.client_got.ends_with("\r\n\r\nhello world")) << what << "\n" << describe(o);
    EXPECT_TRUE(o.origin_got.ends_with("\r\n\r\nhello")) << what;
}

/// An operation failed. Before a whole request head there is no transaction and no
/// record (README: the client left, nothing to answer). After it, exactly one record with
/// the fault and its side: an upstream failure is answered (5xx with X-Dmz-Error, the
/// client's connection is healthy); a client failure leaves the client with a clean close
/// and at most part of the answer.
void expect_fault(const outcome& o, const std::string& what) {
    ASSERT_LE(o.recs.size(), 1u) << what << "\n" << describe(o);
    if (o.recs.empty()) {
        EXPECT_EQ(o.client_got, "") << what << ": answered without a record\n" << describe(o);
        EXPECT_FALSE(o.origin_answered) << what << ": relayed without a record\n" << describe(o);
        return;
    }
    auto& rec = o.recs.front();
    std::string cls = rec["fault"], side = rec.value("fault_side", "");
    EXPECT_NE(cls, "") << what << ": a failed transaction logged without a fault\n" << describe(o);
    EXPECT_TRUE(side == "client" || side == "upstream") << what << ": side '" << side << "'\n" << describe(o);
    if (side == "upstream") {
        int status = rec["status"];
        EXPECT_TRUE(status == 502 || status == 504) << what << "\n" << describe(o);
        EXPECT_EQ(o.client_got.rfind("HTTP/1.1 " + std::to_string(status), 0), 0u) << what << "\n" << describe(o);
        EXPECT_NE(o.client_got.find("X-Dmz-Error: front-end; " + cls), std::string::npos) << what << "\n" << describe(o);
    }
    if (side == "client") {
        EXPECT_FALSE(o.client_got.ends_with("\r\n\r\nhello world")) << what << ": a client fault, yet the whole answer arrived\n"
                                                                     << describe(o);
    }
}

/// n = 1, 2, ... for one kind until a run has no n-th operation of it; returns that n.
unsigned fail_each(bool tls, net::op_kind kind, bool eof = false) {
    unsigned n = 1;
    for (; n < 100; ++n) {
        net::fault_plan plan;
        plan.kind = kind;
        plan.fail_at = n;
        plan.eof = eof;
        auto o = run_http(tls, &plan);
        std::string what = std::string(tls ? "https" : "http") + ", " + net::to_string(kind) + (eof ? " (eof)" : "") + " #" +
                           std::to_string(n);
        expect_clean(o, what);
        if (!plan.fired) {
            expect_success(o, what + " (nothing failed)");
            break;
        }
        expect_fault(o, what);
        if (testing::Test::HasFatalFailure()) break;
    }
    EXPECT_LT(n, 100u) << "the loop did not run out of operations";
    std::cout << "[ injected ] " << (tls ? "https" : "http") << ": " << net::to_string(kind) << (eof ? " (eof)" : "") << " #1.." << n - 1
              << ", then a run with nothing to fail\n";
    return n - 1;
}

TEST(HttpSessionFaults, RelaysPlain) {
    auto o = run_http(false, nullptr);
    expect_clean(o, "http");
    expect_success(o, "http");
    EXPECT_EQ(o.recs.front()["upstream_conn"], "new");
}

TEST(HttpSessionFaults, RelaysTls) {
    auto o = run_http(true, nullptr);
    expect_clean(o, "https");
    expect_success(o, "https");
}

TEST(HttpSessionFaults, EachReadFailsPlain) { EXPECT_GE(fail_each(false, net::op_kind::read), 2u); }
TEST(HttpSessionFaults, EachReadEndsPlain) { EXPECT_GE(fail_each(false, net::op_kind::read, true), 2u); }
TEST(HttpSessionFaults, EachWriteFailsPlain) { EXPECT_GE(fail_each(false, net::op_kind::write), 2u); }
TEST(HttpSessionFaults, ConnectFailsPlain) { EXPECT_EQ(fail_each(false, net::op_kind::connect), 1u); }
TEST(HttpSessionFaults, NoHandshakePlain) { EXPECT_EQ(fail_each(false, net::op_kind::handshake), 0u); }

TEST(HttpSessionFaults, EachReadFailsTls) { EXPECT_GE(fail_each(true, net::op_kind::read), 2u); }
TEST(HttpSessionFaults, EachReadEndsTls) { EXPECT_GE(fail_each(true, net::op_kind::read, true), 2u); }
TEST(HttpSessionFaults, EachWriteFailsTls) { EXPECT_GE(fail_each(true, net::op_kind::write), 2u); }
TEST(HttpSessionFaults, ConnectFailsTls) { EXPECT_EQ(fail_each(true, net::op_kind::connect), 1u); }
TEST(HttpSessionFaults, EachHandshakeFailsTls) { EXPECT_EQ(fail_each(true, net::op_kind::handshake), 2u); }

}  // namespace
}  // namespace dmz::test::sessions
