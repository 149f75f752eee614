// The SMTP machine command by command: replies, the I/O it asks for, what goes upstream, and
// the log records, with the world (rules, user store, base64) faked.
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "dmz/proxy/smtp/machine.hpp"

namespace {

using namespace dmz::smtp;
namespace rules = dmz::rules;

class fake_world final : public callbacks {
public:
    rules::decision evaluate(const rules::facts& f) override {
        facts.push_back(f);
        rules::decision d;
        bool deny = f.rcpt && f.rcpt->ends_with("@elsewhere.example");
        d.result = deny ? rules::verdict::deny : rules::verdict::allow;
        d.rule_name = deny ? "no relay" : "inbound";
        d.reason = deny ? "relaying denied" : "allowed";
        return d;
    }
    /// The user store, as the session's `action::check_credentials` would ask it.
    login_result check(const std::string& user, const std::string& password) {
        if (overloaded) return {.ok = false, .user = "", .refusal = "the password checks are saturated", .overloaded = true};
        if (user == "alice" && password == "secret") return {.ok = true, .user = "alice", .refusal = "", .overloaded = false};
        return {.ok = false, .user = "", .refusal = "bad password", .overloaded = false};
    }
    bool auth_configured() override { return store; }
    std::optional<std::string> base64_decode(const std::string& in) override {
        auto it = base64.find(in);
        if (it == base64.end()) return std::nullopt;
        return it->second;
    }
    void log(const log_entry& e) override { logged.push_back(e); }

    bool store = true;
    bool overloaded = false;
    std::map<std::string, std::string> base64{{"AGFsaWNlAHNlY3JldA==", std::string("\0alice\0secret", 13)},
                                              {"AGFsaWNlAHdyb25n", std::string("\0alice\0wrong", 12)},
                                              {"YWxpY2U=", "alice"},
                                              {"c2VjcmV0", "secret"}};
    std::vector<rules::facts> facts;
    std::vector<log_entry> logged;
};

reply ok(int code, std::vector<std::string> lines = {"ok"}) { return reply{code, std::move(lines)}; }

class SmtpMachine : public ::testing::Test {
protected:
    void make(bool pipelining = true, bool chunking = true, bool tls_offered = true, bool trusted = false) {
        session_facts f;
        f.name = "mx.test";
        f.instance = "front";
        f.listener = "smtp";
        f.client = rules::ip_address::parse("192.0.2.7").value();
        f.max_message_size = 1000;
        f.max_recipients = 2;
        f.command_timeout = std::chrono::seconds(300);
        f.tls_offered = tls_offered;
        f.trusted_peer = trusted;
        f.upstream.pipelining = pipelining;
        f.upstream.chunking = chunking;
        f.upstream.size = true;
        f.upstream.xclient_login = up_xclient;
        m = make_machine(f, world);
        last = m->start();
        EXPECT_EQ(m->take_replies(), "220 mx.test ESMTP dmzproxy\r\n");
    }
    /// One command line; the replies it produced.
    std::string send(const std::string& line) {
        command c;
        std::string err;
        if (!parse_command(line, c, err)) last = m->on_syntax_error(line, err);
        else last = m->on_command(c);
        settle();
        return m->take_replies();
    }
    /// One line of an AUTH exchange; the replies it produced.
    std::string auth_line(const std::string& line) {
        last = m->on_auth_line(line);
        settle();
        return m->take_replies();
    }
    /// Answers a credential check as the session would.
    void settle() {
        if (last.next != action::check_credentials) return;
        EXPECT_EQ(m->state(), state::auth_check);
        last = m->on_credentials(world.check(last.user, last.password));
    }
    std::string upstream(const reply& r) {
        last = m->on_upstream_reply(r);
        return m->take_replies();
    }
    /// EHLO, MAIL and one accepted recipient (pipelined upstream).
    void open_transaction() {
        send("EHLO client.example");
        send("MAIL FROM:<a@example.net>");
        send("RCPT TO:<b@example.org>");
        ASSERT_EQ(last.next, action::upstream);
        upstream(ok(250));
        EXPECT_EQ(upstream(ok(250)), "250 ok\r\n");
        ASSERT_EQ(last.next, action::read_command);
    }

    bool up_xclient = false;
    fake_world world;
    std::unique_ptr<machine> m;
    step last;
};

// ---- EHLO, HELO and the simple verbs ---------------------------------------------------

TEST_F(SmtpMachine, EhloListsCapabilities) {
    make();
    EXPECT_EQ(send("EHLO client.example"), "250-mx.test Hello client.example [192.0.2.7]\r\n250-SIZE 1000\r\n250-PIPELINING\r\n"
                                           "250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 STARTTLS\r\n");
    EXPECT_EQ(last.next, action::read_command);
    EXPECT_EQ(m->ehlo(), "client.example");
    EXPECT_EQ(send("HELO other.example"), "250 mx.test Hello other.example [192.0.2.7]\r\n");
}

TEST_F(SmtpMachine, EhloOffersXclientToATrustedPeerOnly) {
    make(true, true, false, true);
    EXPECT_NE(send("EHLO tier.example").find("250 XCLIENT LOGIN\r\n"), std::string::npos);
}

TEST_F(SmtpMachine, EhloNeedsAnArgument) {
    make();
    EXPECT_EQ(send("EHLO"), "501 5.5.4 EHLO needs a domain or address literal\r\n");
    EXPECT_EQ(m->bad_commands(), 1);
}

TEST_F(SmtpMachine, SimpleVerbs) {
    make();
    EXPECT_EQ(send("NOOP"), "250 2.0.0 OK\r\n");
    EXPECT_EQ(send("VRFY postmaster"), "252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery\r\n");
    EXPECT_EQ(send("HELP"), "214 2.0.0 https://www.rfc-editor.org/rfc/rfc5321\r\n");
    EXPECT_EQ(send("RSET"), "250 2.0.0 OK\r\n");
    EXPECT_EQ(send("EXPN staff"), "502 5.5.1 EXPN is not implemented\r\n");
    EXPECT_EQ(send("FROB"), "500 5.5.2 Syntax error, command unrecognized\r\n");
    EXPECT_EQ(m->bad_commands(), 2);
    EXPECT_EQ(send("QUIT"), "221 2.0.0 mx.test closing connection\r\n");
    EXPECT_EQ(last.next, action::end);
    EXPECT_EQ(m->state(), state::closed);
}

TEST_F(SmtpMachine, TwentyErrorsClose) {
    make();
    for (int i = 0; i < max_client_errors - 1; ++i) {
        send("FROB");
        ASSERT_EQ(last.next, action::read_command);
    }
    EXPECT_EQ(send("FROB"), "500 5.5.2 Syntax error, command unrecognized\r\n421 4.7.0 mx.test too many errors, closing\r\n");
    EXPECT_EQ(last.next, action::end);
}

// ---- framing -----------------------------------------------------------------------------

TEST_F(SmtpMachine, BareLineEndsCloseTheSession) {
    make();
    m->on_bad_line(line_result::bare_lf, "EHLO x\n");
    EXPECT_EQ(m->take_replies(), "500 5.5.2 bare LF in a command; closing\r\n");
    EXPECT_EQ(m->state(), state::closed);
    make();
    last = m->on_bad_line(line_result::bare_cr, "EHLO x\rMAIL");
    EXPECT_EQ(m->take_replies(), "500 5.5.2 bare CR in a command; closing\r\n");
    EXPECT_EQ(last.next, action::end);
}

TEST_F(SmtpMachine, OverLongLineIsSkippedAndCounted) {
    make();
    last = m->on_bad_line(line_result::too_long, std::string(600, 'a'));
    EXPECT_EQ(m->take_replies(), "500 5.5.2 Line too long (the limit is 512 octets)\r\n");
    EXPECT_EQ(last.next, action::skip_line);
    last = m->on_line_skipped();
    EXPECT_EQ(last.next, action::read_command);
    EXPECT_EQ(m->bad_commands(), 0);  // counted towards the limit, not as a bad command
    last = m->on_bad_line(line_result::too_long, "BDAT " + std::string(600, '9'));
    EXPECT_EQ(m->take_replies(), "500 5.5.2 Line too long in a BDAT command; closing\r\n");
    EXPECT_EQ(last.next, action::end);
}

TEST_F(SmtpMachine, SyntaxErrors) {
    make();
    EXPECT_EQ(send("MAIL FROM:a@b").substr(0, 4), "501 ");
    EXPECT_EQ(m->bad_commands(), 1);
    m->on_syntax_error("BDAT x", "501 5.5.4 whatever");
    EXPECT_EQ(m->take_replies(), "501 5.5.4 Syntax: BDAT <size> [LAST]; closing\r\n");
    EXPECT_EQ(m->state(), state::closed);
}

TEST_F(SmtpMachine, ClientTimeoutSays421AndLogsTheTransaction) {
    make();
    send("EHLO c");
    send("MAIL FROM:<a@example.net>");
    last = m->on_client_closed(true);
    EXPECT_EQ(m->take_replies(), "421 4.4.2 mx.test closing: no command within 300 s\r\n");
    EXPECT_EQ(last.next, action::end);
    ASSERT_EQ(world.logged.size(), 1u);
    EXPECT_EQ(world.logged[0].mail_from, "a@example.net");
    EXPECT_EQ(world.logged[0].fault.cls, dmz::rules::fault_class::bad_request);
    EXPECT_EQ(world.logged[0].fault.side, dmz::rules::fault_side::client);
    EXPECT_EQ(world.logged[0].fault.detail, "timed out in a mail transaction");
}

// ---- MAIL --------------------------------------------------------------------------------

TEST_F(SmtpMachine, MailRefusals) {
    make();
    EXPECT_EQ(send("MAIL FROM:<a@example.net>"), "503 5.5.1 Send EHLO or HELO first\r\n");
    send("EHLO c");
    EXPECT_EQ(send("MAIL FROM:<a@example.net> SIZE=1001"),
              "552 5.3.4 Message size exceeds fixed maximum message size (1000)\r\n");
    EXPECT_EQ(send("MAIL FROM:<a@example.net> SIZE=12x"), "501 5.5.4 Bad SIZE parameter\r\n");
    EXPECT_EQ(send("MAIL FROM:<a@example.net> BODY=BINARYMIME"), "501 5.5.4 Bad BODY parameter\r\n");
    EXPECT_EQ(send("MAIL FROM:<a@example.net> AUTH=<>"), "555 5.5.4 Unsupported parameter AUTH\r\n");
    EXPECT_EQ(send("MAIL FROM:<" + std::string(65, 'l') + "@example.net>"),
              "553 5.1.7 Bad sender address syntax (a local part longer than 64 octets)\r\n");
    EXPECT_EQ(send("MAIL FROM:<a@example.net>"), "250 2.1.0 Sender OK\r\n");
    EXPECT_EQ(send("MAIL FROM:<a@example.net>"), "503 5.5.1 Nested MAIL command\r\n");
    EXPECT_EQ(m->bad_commands(), 7);
    EXPECT_TRUE(world.logged.empty());
}

TEST_F(SmtpMachine, MailWaitsForTheFirstRecipientAndCarriesUnderstoodParameters) {
    make(false);
    send("EHLO c");
    EXPECT_EQ(send("MAIL FROM:<a@example.net> SIZE=10 BODY=8BITMIME"), "250 2.1.0 Sender OK\r\n");
    EXPECT_EQ(last.next, action::read_command);  // nothing upstream yet
    send("RCPT TO:<b@example.org>");
    ASSERT_EQ(last.next, action::upstream);
    EXPECT_EQ(last.up.head, "MAIL FROM:<a@example.net> SIZE=10\r\n");  // the upstream offers no 8BITMIME
    EXPECT_EQ(upstream(ok(250)), "");
    ASSERT_EQ(last.next, action::upstream);
    EXPECT_EQ(last.up.head, "RCPT TO:<b@example.org>\r\n");
    EXPECT_EQ(upstream(ok(250)), "250 ok\r\n");
}

// ---- RCPT --------------------------------------------------------------------------------

TEST_F(SmtpMachine, RcptNeedsMail) {
    make();
    send("EHLO c");
    EXPECT_EQ(send("RCPT TO:<b@example.org>"), "503 5.5.1 Need MAIL before RCPT\r\n");
}

TEST_F(SmtpMachine, RcptSyntaxRefusals) {
    make();
    send("EHLO c");
    send("MAIL FROM:<a@example.net>");
    EXPECT_EQ(send("RCPT TO:<>"), "553 5.1.3 An empty recipient is not a mailbox\r\n");
    EXPECT_EQ(send("RCPT TO:<b@" + std::string(256, 'd') + ">"),
              "553 5.1.3 Bad recipient address syntax (a domain longer than 255 octets)\r\n");
    EXPECT_EQ(send("RCPT TO:<b@example.org> NOTIFY=NEVER"), "555 5.5.4 Unsupported parameter NOTIFY\r\n");
    EXPECT_EQ(m->bad_commands(), 3);
    EXPECT_TRUE(world.facts.empty());
}

TEST_F(SmtpMachine, RuleRefusesRecipientWith550) {
    make();
    send("EHLO c");
    send("MAIL FROM:<a@example.net>");
    EXPECT_EQ(send("RCPT TO:<v@elsewhere.example>"), "550 5.7.1 relaying denied (rule 'no relay')\r\n");
    EXPECT_EQ(last.next, action::read_command);  // nothing went upstream
    EXPECT_EQ(m->bad_commands(), 0);
    ASSERT_EQ(world.facts.size(), 1u);
    EXPECT_EQ(world.facts[0].who, rules::identity::anonymous);
    EXPECT_EQ(world.facts[0].mail_from, "a@example.net");
    send("QUIT");
    ASSERT_EQ(world.logged.size(), 1u);
    const auto& e = world.logged[0];
    EXPECT_TRUE(e.denied);
    EXPECT_EQ(e.fault.cls, rules::fault_class::rule_denied);
    EXPECT_EQ(e.fault.rule, "no relay");
    EXPECT_EQ(e.fault.detail, "RCPT v@elsewhere.example: relaying denied");  // never an empty reason
    ASSERT_EQ(e.rcpt_refused.size(), 1u);
    EXPECT_EQ(e.rcpt_refused[0].first, "v@elsewhere.example");
}

TEST_F(SmtpMachine, MailAndFirstRcptArePipelined) {
    make();
    send("EHLO c");
    send("MAIL FROM:<a@example.net>");
    send("RCPT TO:<b@example.org>");
    ASSERT_EQ(last.next, action::upstream);
    EXPECT_EQ(last.up.head, "MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\n");
    EXPECT_FALSE(last.up.message);
    EXPECT_EQ(upstream(ok(250)), "");
    ASSERT_EQ(last.next, action::upstream);  // the pipelined RCPT's answer: nothing to write
    EXPECT_TRUE(last.up.head.empty());
    EXPECT_EQ(upstream(ok(250, {"2.1.5 ok"})), "250 2.1.5 ok\r\n");
    send("RCPT TO:<c@example.org>");
    EXPECT_EQ(last.up.head, "RCPT TO:<c@example.org>\r\n");  // MAIL went already
    upstream(ok(250));
    EXPECT_EQ(send("RCPT TO:<d@example.org>"), "452 4.5.3 Too many recipients\r\n");
}

TEST_F(SmtpMachine, RefusedSenderAnswersTheRecipientAndIsTriedAgain) {
    make();
    send("EHLO c");
    send("MAIL FROM:<a@example.net>");
    send("RCPT TO:<b@example.org>");
    upstream(ok(552, {"5.3.4 too big"}));
    EXPECT_EQ(upstream(ok(503, {"5.5.1 no MAIL"})), "550 5.3.4 too big\r\n");
    send("RCPT TO:<c@example.org>");
    EXPECT_EQ(last.up.head, "MAIL FROM:<a@example.net>\r\nRCPT TO:<c@example.org>\r\n");
    upstream(ok(250));
    upstream(ok(250));
    send("RSET");
    ASSERT_EQ(last.next, action::upstream);
    EXPECT_EQ(last.up.head, "RSET\r\n");
    EXPECT_EQ(upstream(ok(250)), "250 2.0.0 OK\r\n");
    ASSERT_EQ(world.logged.size(), 1u);
    EXPECT_EQ(world.logged[0].note, "the upstream refused MAIL FROM: 550 5.3.4 too big");
    EXPECT_EQ(world.logged[0].rcpt_accepted, std::vector<std::string>{"c@example.org"});
}

TEST_F(SmtpMachine, Upstream421EndsTheSession) {
    make();
    send("EHLO c");
    send("MAIL FROM:<a@example.net>");
    send("RCPT TO:<b@example.org>");
    EXPECT_EQ(upstream(ok(421, {"4.3.2 bye"})), "421 4.3.2 bye\r\n");
    EXPECT_EQ(last.next, action::end);
    EXPECT_FALSE(m->upstream_ready());
    ASSERT_EQ(world.logged.size(), 1u);
    EXPECT_EQ(world.logged[0].fault.cls, rules::fault_class::upstream_protocol);
    EXPECT_EQ(world.logged[0].status, 421);
}

TEST_F(SmtpMachine, UpstreamLostSays421) {
    make();
    open_transaction();
    send("RCPT TO:<c@example.org>");
    last = m->on_upstream_lost("the upstream closed the connection (eof)");
    EXPECT_EQ(m->take_replies(), "421 4.4.2 mx.test (front): the upstream closed the connection (eof); try again later\r\n");
    EXPECT_EQ(last.next, action::end);
    EXPECT_FALSE(m->upstream_ready());
    ASSERT_EQ(world.logged.size(), 1u);
    EXPECT_EQ(world.logged[0].fault.cls, rules::fault_class::upstream_protocol);
    // As before the machine: the status comes from the fault's words, which hold no code.
    EXPECT_EQ(world.logged[0].fault.status, 0);
}

// ---- DATA --------------------------------------------------------------------------------

TEST_F(SmtpMachine, DataRefusals) {
    make();
    send("EHLO c");
    EXPECT_EQ(send("DATA"), "503 5.5.1 Need MAIL before DATA\r\n");
    send("MAIL FROM:<a@example.net>");
    EXPECT_EQ(send("DATA"), "554 5.5.1 No valid recipients\r\n");
    send("RSET");
    open_transaction();
    EXPECT_EQ(send("DATA now"), "501 5.5.4 DATA takes no argument\r\n");
}

TEST_F(SmtpMachine, DataGoesOnByBdatWhenTheUpstreamOffersChunking) {
    make();
    open_transaction();
    EXPECT_EQ(send("DATA"), "354 Start mail input; end with <CRLF>.<CRLF>\r\n");
    ASSERT_EQ(last.next, action::read_data);
    std::string in = "Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n";
    auto used = m->feed_data(in);
    EXPECT_EQ(in.substr(used), "QUIT\r\n");
    ASSERT_TRUE(m->data_complete());
    last = m->on_data_end();
    ASSERT_EQ(last.next, action::upstream);
    EXPECT_EQ(last.up.head, "BDAT 20 LAST\r\n");
    EXPECT_EQ(last.up.body, "Subject: x\r\n\r\n.dot\r\n");
    EXPECT_TRUE(last.up.message);
    EXPECT_EQ(upstream(ok(250, {"2.0.0 Ok: queued as 4F2A1"})), "250 2.0.0 Ok: queued as 4F2A1\r\n");
    ASSERT_EQ(world.logged.size(), 1u);
    EXPECT_EQ(world.logged[0].queue_id, "4F2A1");
    EXPECT_EQ(world.logged[0].status, 250);
    EXPECT_EQ(world.logged[0].size, 21u);  // as it came, dot-stuffing included
}

TEST_F(SmtpMachine, DataGoesOnByDataOtherwise) {
    make(true, false);
    open_transaction();
    send("DATA");
    m->feed_data("hi\r\n.\r\n");
    last = m->on_data_end();
    EXPECT_EQ(last.up.head, "DATA\r\n");
    EXPECT_FALSE(last.up.message);
    EXPECT_EQ(upstream(ok(354, {"go"})), "");
    ASSERT_EQ(last.next, action::upstream);
    EXPECT_EQ(last.up.body, "hi\r\n");
    EXPECT_EQ(last.up.tail, ".\r\n");
    EXPECT_TRUE(last.up.message);
    EXPECT_EQ(upstream(ok(250)), "250 ok\r\n");
    EXPECT_EQ(last.next, action::read_command);
}

TEST_F(SmtpMachine, UpstreamRefusingDataIsRelayedAndReset) {
    make(true, false);
    open_transaction();
    send("DATA");
    m->feed_data("hi\r\n.\r\n");
    m->on_data_end();
    EXPECT_EQ(upstream(ok(554, {"5.5.1 no"})), "554 5.5.1 no\r\n");
    EXPECT_EQ(last.up.head, "RSET\r\n");
    EXPECT_TRUE(world.logged.empty());  // logged once the RSET is answered
    upstream(ok(250));
    ASSERT_EQ(world.logged.size(), 1u);
    EXPECT_EQ(world.logged[0].upstream_reply, "554 5.5.1 no");
}

TEST_F(SmtpMachine, DirtyDataIsRefusedHereAndNeverForwarded) {
    make();
    open_transaction();
    send("DATA");
    m->feed_data("a\nb\r\n.\r\n");
    last = m->on_data_end();
    EXPECT_EQ(m->take_replies(), "554 5.6.0 Message refused: a bare LF is not a line ending (SMTP smuggling shape)\r\n");
    EXPECT_EQ(last.up.head, "RSET\r\n");
    EXPECT_TRUE(last.up.body.empty());
    upstream(ok(250));
    ASSERT_EQ(world.logged.size(), 1u);
    EXPECT_EQ(world.logged[0].fault.cls, rules::fault_class::bad_request);
}

TEST_F(SmtpMachine, ClientClosingInDataLogsABadRequest) {
    make();
    open_transaction();
    send("DATA");
    m->feed_data("half a mess");
    last = m->on_client_closed(false);
    EXPECT_EQ(last.next, action::end);
    ASSERT_EQ(world.logged.size(), 1u);
    EXPECT_EQ(world.logged[0].fault.detail, "the client closed in DATA");
}

// ---- BDAT --------------------------------------------------------------------------------

TEST_F(SmtpMachine, BdatChunksThenLast) {
    make(true, false);
    open_transaction();
    send("BDAT 4");
    ASSERT_EQ(last.next, action::read_chunk);
    EXPECT_EQ(last.chunk_size, 4u);
    m->feed_chunk(".a\r\n");
    EXPECT_EQ((last = m->on_chunk_end(), m->take_replies()), "250 2.0.0 4 octets received\r\n");
    EXPECT_EQ(send("NOOP"), "503 5.5.1 Only BDAT, RSET or QUIT while a BDAT message is in progress\r\n");
    send("BDAT 3 LAST");
    m->feed_chunk("b\r\n");
    last = m->on_chunk_end();
    EXPECT_EQ(last.up.head, "DATA\r\n");  // no CHUNKING upstream
    upstream(ok(354));
    EXPECT_EQ(last.up.body, "..a\r\nb\r\n");  // dot-stuffed for DATA
    EXPECT_EQ(upstream(ok(250)), "250 ok\r\n");
}

TEST_F(SmtpMachine, BdatRefusals) {
    make();
    send("EHLO c");
    send("BDAT 2");
    ASSERT_EQ(last.next, action::read_chunk);  // the octets are read, then dropped
    m->feed_chunk("ab");
    EXPECT_EQ((last = m->on_chunk_end(), m->take_replies()), "503 5.5.1 Need MAIL before BDAT\r\n");
    send("MAIL FROM:<a@example.net>");
    send("BDAT 0 LAST");
    EXPECT_EQ((last = m->on_chunk_end(), m->take_replies()), "554 5.5.1 No valid recipients\r\n");
    EXPECT_EQ(send("BDAT 1001"), "552 5.3.4 A chunk bigger than the maximum message size (1000); closing\r\n");
    EXPECT_EQ(last.next, action::end);
    make();
    EXPECT_EQ(send("BDAT 12 FIRST"), "501 5.5.4 Syntax: BDAT <size> [LAST]; closing\r\n");
    EXPECT_EQ(last.next, action::end);
}

TEST_F(SmtpMachine, RefusedChunkRefusesTheRestUntilRset) {
    make();
    open_transaction();
    send("BDAT 3");
    m->feed_chunk("a\nb");
    last = m->on_chunk_end();
    EXPECT_EQ(m->take_replies().substr(0, 10), "554 5.6.0 ");
    EXPECT_EQ(last.next, action::read_command);
    send("BDAT 1 LAST");
    m->feed_chunk("x");
    EXPECT_EQ((last = m->on_chunk_end(), m->take_replies()),
              "503 5.5.1 An earlier BDAT of this transaction failed; send RSET\r\n");
    send("RSET");
    EXPECT_EQ(last.up.head, "RSET\r\n");
    EXPECT_EQ(upstream(ok(250)), "250 2.0.0 OK\r\n");
}

TEST_F(SmtpMachine, RefusedBdatMessageResetsTheUpstream) {
    make();
    open_transaction();
    send("BDAT 3 LAST");
    m->feed_chunk("x\r\n");
    last = m->on_chunk_end();
    EXPECT_EQ(last.up.head, "BDAT 3 LAST\r\n");
    EXPECT_EQ(upstream(ok(554, {"5.6.0 no"})), "554 5.6.0 no\r\n");
    EXPECT_EQ(last.up.head, "RSET\r\n");
    ASSERT_EQ(world.logged.size(), 1u);  // logged before the RSET
    upstream(ok(250));
    EXPECT_EQ(last.next, action::read_command);
}

// ---- STARTTLS, AUTH, XCLIENT -----------------------------------------------------------

TEST_F(SmtpMachine, Starttls) {
    make(true, true, false);
    EXPECT_EQ(send("STARTTLS"), "502 5.5.1 STARTTLS is not offered on this listener (no certificate)\r\n");
    make();
    EXPECT_EQ(send("STARTTLS now"), "501 5.5.4 STARTTLS takes no argument\r\n");
    send("EHLO c");
    send("MAIL FROM:<a@example.net>");
    EXPECT_EQ(send("STARTTLS"), "503 5.5.1 STARTTLS inside a mail transaction; send RSET first\r\n");
    send("RSET");
    EXPECT_EQ(send("STARTTLS"), "220 2.0.0 Ready to start TLS\r\n");
    EXPECT_EQ(last.next, action::start_tls);
    EXPECT_EQ(m->state(), state::tls_handshake);
    last = m->on_tls_started();
    EXPECT_EQ(m->ehlo(), "");
    auto caps = send("EHLO c");
    EXPECT_EQ(caps.find("STARTTLS"), std::string::npos);
    EXPECT_NE(caps.find("250 AUTH PLAIN LOGIN\r\n"), std::string::npos);
    EXPECT_EQ(send("STARTTLS"), "503 5.5.1 TLS already active\r\n");
}

TEST_F(SmtpMachine, AuthNeedsTlsAndAStore) {
    make();
    EXPECT_EQ(send("AUTH PLAIN"), "538 5.7.11 Encryption required for requested authentication mechanism (use STARTTLS)\r\n");
    send("STARTTLS");
    m->on_tls_started();
    world.store = false;
    EXPECT_EQ(send("AUTH PLAIN"),
              "535 5.7.8 Authentication is not available on this listener (no user store is configured)\r\n");
    world.store = true;
    EXPECT_EQ(send("AUTH CRAM-MD5"), "504 5.5.4 Unrecognized authentication type (PLAIN and LOGIN are offered)\r\n");
}

TEST_F(SmtpMachine, AuthPlainAndItsRefusals) {
    make();
    send("STARTTLS");
    m->on_tls_started();
    EXPECT_EQ(send("AUTH PLAIN"), "334 \r\n");
    ASSERT_EQ(last.next, action::read_auth_line);
    EXPECT_EQ(auth_line("*"), "501 5.7.0 Authentication cancelled\r\n");
    EXPECT_EQ(send("AUTH PLAIN AGFsaWNlAHdyb25n"), "535 5.7.8 Authentication credentials invalid\r\n");
    ASSERT_EQ(world.logged.size(), 1u);
    EXPECT_EQ(world.logged[0].fault.cls, rules::fault_class::auth_failed);
    EXPECT_EQ(world.logged[0].fault.detail, "AUTH PLAIN refused for 'alice' (bad password)");
    EXPECT_EQ(send("AUTH PLAIN bm9wZQ=="), "501 5.5.2 Malformed PLAIN response\r\n");
    EXPECT_EQ(send("AUTH PLAIN AGFsaWNlAHNlY3JldA=="), "235 2.7.0 Authentication successful\r\n");
    EXPECT_EQ(m->user(), "alice");
    EXPECT_EQ(send("AUTH PLAIN AGFsaWNlAHNlY3JldA=="), "503 5.5.1 Already authenticated\r\n");
    send("EHLO c");
    send("MAIL FROM:<a@example.net>");
    send("RCPT TO:<v@example.org>");
    EXPECT_EQ(world.facts.back().who, rules::identity::authenticated);
}

TEST_F(SmtpMachine, AuthLoginTakesTwoLines) {
    make();
    send("STARTTLS");
    m->on_tls_started();
    EXPECT_EQ(send("AUTH LOGIN"), "334 VXNlcm5hbWU6\r\n");
    EXPECT_EQ(auth_line("YWxpY2U="), "334 UGFzc3dvcmQ6\r\n");
    ASSERT_EQ(last.next, action::read_auth_line);
    last = m->on_auth_line("c2VjcmV0");
    ASSERT_EQ(last.next, action::check_credentials);  // the session checks off the event loop
    EXPECT_EQ(last.user, "alice");
    EXPECT_EQ(last.password, "secret");
    EXPECT_EQ(m->take_replies(), "");
    settle();
    EXPECT_EQ(m->take_replies(), "235 2.7.0 Authentication successful\r\n");
    EXPECT_EQ(last.next, action::read_command);
}

TEST_F(SmtpMachine, SaturatedChecksAnswer454) {
    make();
    send("STARTTLS");
    m->on_tls_started();
    world.overloaded = true;
    EXPECT_EQ(send("AUTH PLAIN AGFsaWNlAHNlY3JldA=="), "454 4.7.0 Temporary authentication failure\r\n");
    ASSERT_EQ(world.logged.size(), 1u);
    EXPECT_EQ(world.logged[0].status, 454);
    EXPECT_EQ(world.logged[0].fault.cls, rules::fault_class::overloaded);
    EXPECT_EQ(m->user(), "");
    world.overloaded = false;
    EXPECT_EQ(send("AUTH PLAIN AGFsaWNlAHNlY3JldA=="), "235 2.7.0 Authentication successful\r\n");
}

TEST_F(SmtpMachine, MalformedAuthLineCloses) {
    make();
    send("STARTTLS");
    m->on_tls_started();
    send("AUTH LOGIN");
    last = m->on_auth_line_malformed();
    EXPECT_EQ(m->take_replies(), "500 5.5.2 Malformed authentication response; closing\r\n");
    EXPECT_EQ(last.next, action::end);
}

TEST_F(SmtpMachine, AuthPassesTheUserToAnXclientUpstream) {
    up_xclient = true;
    make();
    send("STARTTLS");
    m->on_tls_started();
    send("EHLO c");
    EXPECT_EQ(send("AUTH PLAIN AGFsaWNlAHNlY3JldA=="), "235 2.7.0 Authentication successful\r\n");
    ASSERT_EQ(last.next, action::upstream);
    EXPECT_EQ(last.up.head, "XCLIENT LOGIN=alice\r\n");
    EXPECT_EQ(upstream(ok(220, {"next ESMTP"})), "");  // the new greeting is the upstream's own
    EXPECT_EQ(last.up.head, "EHLO mx.test\r\n");
    upstream(ok(250, {"next", "PIPELINING"}));
    EXPECT_EQ(last.next, action::read_command);
}

TEST_F(SmtpMachine, RefusedXclientIsLoggedWithTheTransaction) {
    up_xclient = true;
    make();
    send("STARTTLS");
    m->on_tls_started();
    send("AUTH PLAIN AGFsaWNlAHNlY3JldA==");
    upstream(ok(550, {"5.7.0 not you"}));
    EXPECT_EQ(last.next, action::read_command);
    open_transaction();
    send("QUIT");
    ASSERT_EQ(world.logged.size(), 1u);
    EXPECT_EQ(world.logged[0].note, "the next tier refused XCLIENT: 550 5.7.0 not you");
}

TEST_F(SmtpMachine, UpstreamRefusingEhloAfterXclientEndsTheSession) {
    up_xclient = true;
    make(true, true, true, true);
    send("XCLIENT LOGIN=bob");
    upstream(ok(220));
    EXPECT_EQ(upstream(ok(554, {"no"})),
              "421 4.4.2 mx.test (front): the upstream refused EHLO after XCLIENT: no; try again later\r\n");
    EXPECT_EQ(last.next, action::end);
}

TEST_F(SmtpMachine, XclientFromATrustedTierPassesOn) {
    make(true, true, true, true);
    EXPECT_EQ(send("XCLIENT LOGIN=bob NAME=x"), "220 mx.test ESMTP dmzproxy\r\n");
    EXPECT_EQ(m->user(), "bob");
    EXPECT_EQ(send("XCLIENT LOGIN"), "501 5.5.4 Bad XCLIENT attribute\r\n");
    EXPECT_EQ(send("XCLIENT LOGIN=[UNAVAILABLE]"), "220 mx.test ESMTP dmzproxy\r\n");
    EXPECT_EQ(m->user(), "");
    send("EHLO c");
    send("MAIL FROM:<a@example.net>");
    EXPECT_EQ(send("XCLIENT LOGIN=bob"), "503 5.5.1 XCLIENT is not permitted during a mail transaction\r\n");
    make();
    EXPECT_EQ(send("XCLIENT LOGIN=bob"), "550 5.7.0 XCLIENT is accepted only from a trusted previous tier\r\n");
}

TEST(SmtpCapabilities, ReadsTheUpstreamEhlo) {
    auto c = parse_capabilities(reply{250, {"mx", "PIPELINING", "SIZE 100", "CHUNKING", "8BITMIME", "XCLIENT NAME LOGIN"}});
    EXPECT_TRUE(c.pipelining && c.size && c.chunking && c.eight_bit && c.xclient_login);
    auto none = parse_capabilities(reply{250, {"mx", "XCLIENT NAME"}});
    EXPECT_FALSE(none.pipelining || none.xclient_login);
}

}  // namespace
