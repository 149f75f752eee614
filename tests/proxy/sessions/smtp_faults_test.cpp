// An SMTP session inside the test (plain, STARTTLS toward the client, and `tcp` mode, the
// byte pipe): one mail relayed to a fake upstream, once as it goes, then again for every n
// with the n-th read, write, upstream connect or TLS handshake failing, until a run has no
// n-th operation of that kind.
// Every run must end (no hang), leave no session, connection or descriptor behind, write
// exactly one access-log record, and leave the client with a reply or a clean close.
#include <iostream>

#include "proxy/sessions/rig.hpp"

namespace dmz::test::sessions {
namespace {

using json = nlohmann::json;

const std::string smtp_config = R"([instance]
name = "front-end"

[listeners.smtp]
protocol = "smtp"
bind = ["127.0.0.1:{FRONT}"]
public_name = "mail.contoso.com"
certificates = [{ names = ["mail.contoso.com"], cert = "{CERT}", key = "{KEY}" }]
timeouts = { head = "5s", command = "5s" }

[[rules]]
name = "Mail"
kind = "server"
action = "allow"
listeners = ["smtp"]
from = ["External"]
accepted_domains = ["contoso.com"]
target = { address = "127.0.0.1", port = {ORIGIN}, timeouts = { connect = "5s", read = "5s" } }
)";

struct outcome : aftermath {
    bool ended = false;
    std::vector<int> client_codes;  ///< the replies the client got, in order
    std::string client_last;        ///< the last reply's text
    int queued = 0;                 ///< messages the upstream accepted
    int smtp_left = 0;
    int fds_before = 0, fds_after = 0;
};

/// One reply (all its lines) from `p.in`, reading as needed; its code, or 0 when the
/// connection ended first.
task<int> read_reply(peer& p, std::string& text) {
    while (true) {
        std::size_t at = 0;
        while (true) {
            auto eol = p.in.find("\r\n", at);
            if (eol == std::string::npos) break;
            if (eol - at >= 4 && p.in[at + 3] == ' ') {
                text = p.in.substr(0, eol);
                p.in.erase(0, eol + 2);
                co_return std::atoi(text.substr(at, 3).c_str());
            }
            at = eol + 2;
        }
        bool more = co_await p.read_more();
        if (!more) co_return 0;
    }
}

/// A command and its reply's code (0: the connection ended). A string_view: GCC 12
/// destroys a std::string temporary inside a co_await twice.
task<int> command(peer& p, std::string_view line, outcome& out) {
    std::string wire = std::string(line) + "\r\n";
    bool sent = co_await p.write(wire);
    if (!sent) co_return 0;
    std::string text;
    int code = co_await read_reply(p, text);
    if (code) out.client_codes.push_back(code), out.client_last = text;
    co_return code;
}

/// The client's dialogue; stops at the first reply it did not expect.
task<> dialogue(peer& p, bool starttls, ssl::context& ctx, outcome& out) {
    std::string text;
    int banner = co_await read_reply(p, text);
    if (banner) out.client_codes.push_back(banner), out.client_last = text;
    if (banner != 220) co_return;
    struct step {
        std::string_view line;
        int want;
    };
    std::vector<step> steps{{"EHLO client.example.net", 250}};
    if (starttls) steps.push_back({"STARTTLS", 220});
    for (auto& st : steps) {
        int got = co_await command(p, st.line, out);
        if (got != st.want) co_return;
    }
    if (starttls) {
        bool ok = co_await p.handshake(ctx, ssl::stream_base::client);
        if (!ok) co_return;
        int got = co_await command(p, "EHLO client.example.net", out);
        if (got != 250) co_return;
    }
    steps = {{"MAIL FROM:<a@example.net>", 250},
             {"RCPT TO:<admin@contoso.com>", 250},
             {"DATA", 354},
             {"Subject: test\r\n\r\nhello\r\n.", 250},
             {"QUIT", 221}};
    for (auto& st : steps) {
        int got = co_await command(p, st.line, out);
        if (got != st.want) co_return;
    }
}

task<> client(rig& r, bool starttls, ssl::context& ctx, outcome& out) {
    tcp::socket s(r.worker().io);
    error_code ec;
    co_await s.async_connect(r.front(), net::redirect(ec));
    peer p(std::move(s));
    if (!ec) co_await dialogue(p, starttls, ctx, out);
    co_await p.read_to_end();  // the session closes the connection
    p.close();
    r.close_acceptors();
}

/// The upstream: a line-at-a-time SMTP server that queues what DATA brings.
task<> sink(rig& r, outcome& out) {
    tcp::socket s(r.worker().io);
    error_code ec;
    co_await r.origin().async_accept(s, net::redirect(ec));
    if (ec) co_return;
    peer p(std::move(s));
    bool ok = co_await p.write("220 sink.contoso.com ESMTP\r\n");
    while (ok) {
        ok = co_await p.read_until("\r\n");
        if (!ok) break;
        auto eol = p.in.find("\r\n");
        std::string line = p.in.substr(0, eol);
        p.in.erase(0, eol + 2);
        std::string verb = line.substr(0, 4);
        if (verb == "EHLO" || verb == "HELO") ok = co_await p.write("250-sink.contoso.com\r\n250 8BITMIME\r\n");
        else if (verb == "MAIL" || verb == "RCPT" || verb == "RSET" || verb == "NOOP") ok = co_await p.write("250 2.1.0 OK\r\n");
        else if (verb == "QUIT") {
            co_await p.write("221 2.0.0 bye\r\n");
            break;
        } else if (verb == "DATA") {
            ok = co_await p.write("354 go ahead\r\n");
            if (ok) ok = co_await p.read_until("\r\n.\r\n");
            if (!ok) break;
            p.in.erase(0, p.in.find("\r\n.\r\n") + 5);
            ++out.queued;
            ok = co_await p.write("250 2.0.0 Ok: queued as ABC123\r\n");
        } else
            ok = co_await p.write("500 5.5.2 what\r\n");
    }
    p.close();
}

/// How the session publishes: SMTP-aware (plain or with STARTTLS), or a `tcp` byte pipe.
enum class way { plain, starttls, tcp };

std::string name_of(way w) { return w == way::plain ? "smtp" : w == way::starttls ? "smtp+starttls" : "tcp mode"; }

std::string config_for(way w) {
    if (w != way::tcp) return smtp_config;
    auto c = smtp_config;
    auto at = c.find("target = { address");
    return c.insert(at + std::string("target = { ").size(), "mode = \"tcp\", ");
}

outcome run_smtp(way how, net::fault_plan* plan) {
    bool starttls = how == way::starttls;
    outcome out;
    out.fds_before = open_fds();
    {
        auto cctx = client_context();
        rig r(config_for(how));
        r.worker().faults = plan;
        r.serve_one();
        r.spawn([&]() { return sink(r, out); });
        r.spawn([&]() { return client(r, starttls, cctx, out); });
        out.ended = r.run();
        static_cast<aftermath&>(out) = collect(r);
        out.smtp_left = proxy::smtp_sessions().load();
    }
    out.fds_after = open_fds();
    return out;
}

std::string describe(const outcome& o) {
    std::string s = "client got:";
    for (int c : o.client_codes) s += " " + std::to_string(c);
    s += " (last: " + o.client_last + "); upstream queued " + std::to_string(o.queued) + "\nrecords:\n";
    for (auto& r : o.recs) s += r.dump() + "\n";
    return s + o.peer_errors;
}

void expect_clean(const outcome& o, const std::string& what) {
    EXPECT_TRUE(o.ended) << what << ": the worker still had work after 10 s (a hang)\n" << describe(o);
    EXPECT_EQ(o.smtp_left, 0) << what << ": a session outlived its connection";
    EXPECT_EQ(o.open_connections, 0) << what << ": the open-connection gauge did not return to 0";
    EXPECT_EQ(o.internal_faults, 0u) << what << ": an exception escaped";
    EXPECT_EQ(o.fds_after, o.fds_before) << what << ": descriptors leaked";
    EXPECT_EQ(o.peer_errors, "") << what;
    EXPECT_EQ(o.recs.size(), 1u) << what << ": one record per session or mail\n" << describe(o);
}

std::vector<int> all_replies(way how) {
    if (how == way::starttls) return {220, 250, 220, 250, 250, 250, 354, 250, 221};
    return {220, 250, 250, 250, 354, 250, 221};
}

void expect_success(const outcome& o, way how, const std::string& what) {
    EXPECT_EQ(o.client_codes, all_replies(how)) << what << "\n" << describe(o);
    EXPECT_EQ(o.queued, 1) << what;
    ASSERT_EQ(o.recs.size(), 1u) << what;
    auto& rec = o.recs.front();
    EXPECT_EQ(rec["fault"], "") << what << "\n" << describe(o);
    if (how == way::tcp) {  // a byte pipe: no SMTP fields, the bytes each way
        EXPECT_EQ(rec["detail"], "tcp mode") << what;
        EXPECT_GT(rec["bytes_in"].get<std::uint64_t>(), 100u) << what;
        EXPECT_GT(rec["bytes_out"].get<std::uint64_t>(), 100u) << what;
        return;
    }
    EXPECT_EQ(rec["status"], 250) << what;
    EXPECT_EQ(rec["mail_from"], "a@example.net") << what;
    EXPECT_EQ(rec["tls"], how == way::starttls) << what;
}

/// tcp mode cannot know a mail, only the connection: a failed operation that cut the
/// dialogue short is a fault with its side; an end from either party is not.
void expect_pipe_fault(const outcome& o, bool eof, const std::string& what) {
    if (o.recs.size() != 1) return;
    auto& rec = o.recs.front();
    std::string cls = rec["fault"], side = rec.value("fault_side", "");
    if (!cls.empty()) {
        EXPECT_TRUE(side == "client" || side == "upstream") << what << ": side '" << side << "'\n" << describe(o);
    }
    if (!eof && o.client_codes != all_replies(way::tcp)) {
        EXPECT_NE(cls, "") << what << ": the dialogue was cut short by a failure, and the record says nothing\n" << describe(o);
    }
}

/// An operation failed. The one record: the mail, delivered (the upstream queued it: 250,
/// no fault) or not (a fault, with its side); or the session's record when no mail began.
/// An upstream failure is told to the client (421); a client failure ends in a close.
void expect_fault(const outcome& o, const std::string& what) {
    if (o.recs.size() != 1) return;  // expect_clean said so
    auto& rec = o.recs.front();
    std::string cls = rec["fault"], side = rec.value("fault_side", "");
    bool mail = rec["mail_from"] != "";
    if (mail && cls.empty()) {
        EXPECT_EQ(rec["status"], 250) << what << ": an unfinished mail logged without a fault\n" << describe(o);
        EXPECT_EQ(o.queued, 1) << what << ": logged as delivered, never queued\n" << describe(o);
    }
    if (!cls.empty()) {
        EXPECT_TRUE(side == "client" || side == "upstream") << what << ": side '" << side << "'\n" << describe(o);
    }
    if (side == "upstream") {
        ASSERT_FALSE(o.client_codes.empty()) << what << "\n" << describe(o);
        EXPECT_EQ(o.client_codes.back(), 421) << what << ": the client was not told\n" << describe(o);
    }
    if (!mail && cls.empty()) {
        EXPECT_EQ(o.queued, 0) << what << "\n" << describe(o);
        EXPECT_NE(rec.value("detail", ""), "") << what << ": a session record says why it ended\n" << describe(o);
    }
}

unsigned fail_each(way how, net::op_kind kind, bool eof = false) {
    unsigned n = 1;
    for (; n < 100; ++n) {
        net::fault_plan plan;
        plan.kind = kind;
        plan.fail_at = n;
        plan.eof = eof;
        auto o = run_smtp(how, &plan);
        std::string what = name_of(how) + ", " + net::to_string(kind) + (eof ? " (eof)" : "") + " #" + std::to_string(n);
        expect_clean(o, what);
        if (!plan.fired) {
            expect_success(o, how, what + " (nothing failed)");
            break;
        }
        if (how == way::tcp) expect_pipe_fault(o, eof, what);
        else expect_fault(o, what);
        if (testing::Test::HasFatalFailure()) break;
    }
    EXPECT_LT(n, 100u) << "the loop did not run out of operations";
    std::cout << "[ injected ] " << name_of(how) << ": " << net::to_string(kind) << (eof ? " (eof)" : "") << " #1.." << n - 1
              << ", then a run with nothing to fail\n";
    return n - 1;
}

TEST(SmtpSessionFaults, RelaysPlain) {
    auto o = run_smtp(way::plain, nullptr);
    expect_clean(o, "smtp");
    expect_success(o, way::plain, "smtp");
}

TEST(SmtpSessionFaults, RelaysStarttls) {
    auto o = run_smtp(way::starttls, nullptr);
    expect_clean(o, "smtp+starttls");
    expect_success(o, way::starttls, "smtp+starttls");
}

TEST(SmtpSessionFaults, PipesInTcpMode) {
    auto o = run_smtp(way::tcp, nullptr);
    expect_clean(o, "tcp mode");
    expect_success(o, way::tcp, "tcp mode");
}

TEST(SmtpSessionFaults, EachReadFailsPlain) { EXPECT_GE(fail_each(way::plain, net::op_kind::read), 5u); }
TEST(SmtpSessionFaults, EachReadEndsPlain) { EXPECT_GE(fail_each(way::plain, net::op_kind::read, true), 5u); }
TEST(SmtpSessionFaults, EachWriteFailsPlain) { EXPECT_GE(fail_each(way::plain, net::op_kind::write), 5u); }
TEST(SmtpSessionFaults, ConnectFailsPlain) { EXPECT_EQ(fail_each(way::plain, net::op_kind::connect), 1u); }

TEST(SmtpSessionFaults, EachReadFailsStarttls) { EXPECT_GE(fail_each(way::starttls, net::op_kind::read), 5u); }
TEST(SmtpSessionFaults, EachReadEndsStarttls) { EXPECT_GE(fail_each(way::starttls, net::op_kind::read, true), 5u); }
TEST(SmtpSessionFaults, EachWriteFailsStarttls) { EXPECT_GE(fail_each(way::starttls, net::op_kind::write), 5u); }
TEST(SmtpSessionFaults, HandshakeFailsStarttls) { EXPECT_EQ(fail_each(way::starttls, net::op_kind::handshake), 1u); }

TEST(SmtpSessionFaults, EachReadFailsTcpMode) { EXPECT_GE(fail_each(way::tcp, net::op_kind::read), 3u); }
TEST(SmtpSessionFaults, EachReadEndsTcpMode) { EXPECT_GE(fail_each(way::tcp, net::op_kind::read, true), 3u); }
TEST(SmtpSessionFaults, EachWriteFailsTcpMode) { EXPECT_GE(fail_each(way::tcp, net::op_kind::write), 3u); }
TEST(SmtpSessionFaults, ConnectFailsTcpMode) { EXPECT_EQ(fail_each(way::tcp, net::op_kind::connect), 1u); }

}  // namespace
}  // namespace dmz::test::sessions
