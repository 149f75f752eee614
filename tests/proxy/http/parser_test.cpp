// The strict HTTP/1.1 head parser and chunked decoder, fed raw bytes.
#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "dmz/proxy/http/parser.hpp"

using namespace dmz::http;

namespace {

// The head's views point into `text`, so the outcome keeps its own copy alive.
struct outcome {
    std::shared_ptr<std::string> text;
    result r;
    request_head head;
    parse_error err;
};

outcome req(const std::string& text, limits lim = {}) {
    outcome o;
    o.text = std::make_shared<std::string>(text);
    o.r = parse_request(*o.text, lim, o.head, o.err);
    return o;
}

struct bad_case {
    const char* name;
    std::string text;
    int status;
    const char* code;
};

class BadRequest : public ::testing::TestWithParam<bad_case> {};

TEST_P(BadRequest, IsRefusedWithTheRightStatus) {
    auto& c = GetParam();
    auto o = req(c.text);
    ASSERT_EQ(o.r, result::error) << c.name;
    EXPECT_EQ(o.err.status, c.status) << c.name << ": " << o.err.detail;
    EXPECT_EQ(o.err.code, c.code) << c.name << ": " << o.err.detail;
}

const std::string H = "Host: mail.contoso.com\r\n";

INSTANTIATE_TEST_SUITE_P(
    Framing, BadRequest,
    ::testing::Values(
        bad_case{"cl_and_te", "POST /owa/ HTTP/1.1\r\n" + H + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "cl-and-te"},
        bad_case{"differing_cl", "POST /owa/ HTTP/1.1\r\n" + H + "Content-Length: 5\r\nContent-Length: 6\r\n\r\n", 400, "bad-content-length"},
        bad_case{"differing_cl_list", "POST /owa/ HTTP/1.1\r\n" + H + "Content-Length: 5, 6\r\n\r\n", 400, "bad-content-length"},
        bad_case{"signed_cl", "POST /owa/ HTTP/1.1\r\n" + H + "Content-Length: +5\r\n\r\n", 400, "bad-content-length"},
        bad_case{"hex_cl", "POST /owa/ HTTP/1.1\r\n" + H + "Content-Length: 0x5\r\n\r\n", 400, "bad-content-length"},
        bad_case{"space_in_cl", "POST /owa/ HTTP/1.1\r\n" + H + "Content-Length: 1 2\r\n\r\n", 400, "bad-content-length"},
        bad_case{"huge_cl", "POST /owa/ HTTP/1.1\r\n" + H + "Content-Length: 99999999999999999999\r\n\r\n", 400, "bad-content-length"},
        bad_case{"te_not_chunked_last", "POST /owa/ HTTP/1.1\r\n" + H + "Transfer-Encoding: chunked, gzip\r\n\r\n", 400, "bad-transfer-encoding"},
        bad_case{"te_identity", "POST /owa/ HTTP/1.1\r\n" + H + "Transfer-Encoding: identity\r\n\r\n", 400, "bad-transfer-encoding"},
        bad_case{"te_chunked_twice", "POST /owa/ HTTP/1.1\r\n" + H + "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "bad-transfer-encoding"},
        bad_case{"te_xchunked", "POST /owa/ HTTP/1.1\r\n" + H + "Transfer-Encoding: xchunked\r\n\r\n", 400, "bad-transfer-encoding"},
        bad_case{"te_gzip_chunked", "POST /owa/ HTTP/1.1\r\n" + H + "Transfer-Encoding: gzip, chunked\r\n\r\n", 501, "unsupported-transfer-coding"},
        bad_case{"te_in_http10", "POST /owa/ HTTP/1.0\r\n" + H + "Transfer-Encoding: chunked\r\n\r\n", 400, "te-in-http10"},
        bad_case{"obs_fold", "GET /owa/ HTTP/1.1\r\n" + H + "X-A: one\r\n two\r\n\r\n", 400, "obs-fold"},
        bad_case{"bare_lf_in_field", "GET /owa/ HTTP/1.1\r\n" + H + "X-A: one\n\r\n", 400, "bare-lf"},
        bad_case{"bare_lf_line_end", "GET /owa/ HTTP/1.1\n" + H + "\r\n", 400, "bare-lf"},
        bad_case{"bare_cr", "GET /owa/ HTTP/1.1\r\n" + H + "X-A: one\rtwo\r\n\r\n", 400, "bare-cr"},
        bad_case{"nul_in_value", std::string("GET /owa/ HTTP/1.1\r\n") + H + std::string("X-A: a\0b\r\n\r\n", 13), 400, "nul-byte"},
        bad_case{"ctl_in_value", "GET /owa/ HTTP/1.1\r\n" + H + "X-A: a\x01" "b\r\n\r\n", 400, "bad-field-value"},
        bad_case{"space_before_colon", "GET /owa/ HTTP/1.1\r\n" + H + "Content-Length : 5\r\n\r\n", 400, "space-before-colon"},
        bad_case{"tab_before_colon", "GET /owa/ HTTP/1.1\r\n" + H + "Transfer-Encoding\t: chunked\r\n\r\n", 400, "space-before-colon"},
        bad_case{"bad_field_name", "GET /owa/ HTTP/1.1\r\n" + H + "X(A): 1\r\n\r\n", 400, "bad-field-name"},
        bad_case{"empty_field_name", "GET /owa/ HTTP/1.1\r\n" + H + ": 1\r\n\r\n", 400, "bad-field-name"},
        bad_case{"no_colon", "GET /owa/ HTTP/1.1\r\n" + H + "X-A 1\r\n\r\n", 400, "bad-field"},
        bad_case{"missing_host", "GET /owa/ HTTP/1.1\r\nX-A: 1\r\n\r\n", 400, "missing-host"},
        bad_case{"repeated_host", "GET /owa/ HTTP/1.1\r\n" + H + H + "\r\n", 400, "repeated-host"},
        bad_case{"bad_host", "GET /owa/ HTTP/1.1\r\nHost: mail contoso\r\n\r\n", 400, "bad-host"},
        bad_case{"host_with_userinfo", "GET /owa/ HTTP/1.1\r\nHost: a@mail.contoso.com\r\n\r\n", 400, "bad-host"},
        bad_case{"authority_mismatch", "GET http://evil.example/owa/ HTTP/1.1\r\n" + H + "\r\n", 400, "authority-mismatch"},
        bad_case{"authority_userinfo", "GET http://x@mail.contoso.com/owa/ HTTP/1.1\r\n" + H + "\r\n", 400, "bad-target"},
        bad_case{"http2_version", "GET /owa/ HTTP/2.0\r\n" + H + "\r\n", 505, "bad-version"},
        bad_case{"lowercase_version", "GET /owa/ http/1.1\r\n" + H + "\r\n", 400, "bad-request-line"},
        bad_case{"double_space", "GET  /owa/ HTTP/1.1\r\n" + H + "\r\n", 400, "bad-request-line"},
        bad_case{"bad_method", "G(ET /owa/ HTTP/1.1\r\n" + H + "\r\n", 400, "bad-method"},
        bad_case{"asterisk_with_get", "GET * HTTP/1.1\r\n" + H + "\r\n", 400, "bad-target"},
        bad_case{"connect", "CONNECT mail.contoso.com:443 HTTP/1.1\r\n" + H + "\r\n", 405, "connect-refused"},
        bad_case{"tls_on_plain", std::string("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 11), 400, "tls-on-plain"},
        bad_case{"bad_expect", "POST /owa/ HTTP/1.1\r\n" + H + "Expect: 200-ok\r\nContent-Length: 1\r\n\r\n", 417, "bad-expect"}),
    [](const auto& p) { return std::string(p.param.name); });

TEST(RequestHead, ParsesAnRpcInDataChannel) {
    auto o = req("RPC_IN_DATA /rpc/rpcproxy.dll?ex01.corp.contoso.com:6001 HTTP/1.0\r\n"
                 "Host: mail.contoso.com\r\nConnection: Keep-Alive\r\nContent-Length: 1073741824\r\n"
                 "Authorization: NTLM TlRMTVNTUAABAAAA\r\n\r\n");
    ASSERT_EQ(o.r, result::done) << o.err.detail;
    EXPECT_EQ(o.head.method, "RPC_IN_DATA");
    EXPECT_EQ(o.head.target, "/rpc/rpcproxy.dll?ex01.corp.contoso.com:6001");
    EXPECT_EQ(o.head.version_minor, 0);
    EXPECT_TRUE(o.head.keep_alive);  // HTTP/1.0 with Connection: Keep-Alive
    EXPECT_EQ(o.head.body, body_kind::length);
    EXPECT_EQ(o.head.content_length, 1073741824u);
    EXPECT_EQ(o.head.get("authorization"), "NTLM TlRMTVNTUAABAAAA");
}

TEST(RequestHead, ChunkedExpectAndConnectionTokens) {
    auto o = req("POST /mapi/emsmdb HTTP/1.1\r\nHost: mail.contoso.com\r\nTransfer-Encoding: Chunked\r\n"
                 "Expect: 100-Continue\r\nConnection: close, X-Secret\r\n\r\n");
    ASSERT_EQ(o.r, result::done) << o.err.detail;
    EXPECT_EQ(o.head.body, body_kind::chunked);
    EXPECT_TRUE(o.head.expect_continue);
    EXPECT_FALSE(o.head.keep_alive);
    EXPECT_EQ(o.head.connection_tokens, (std::vector<std::string>{"close", "x-secret"}));
}

TEST(RequestHead, IdenticalRepeatedContentLengthIsOneLength) {
    auto o = req("POST /owa/ HTTP/1.1\r\n" + H + "Content-Length: 7\r\nContent-Length: 7\r\n\r\n");
    ASSERT_EQ(o.r, result::done) << o.err.detail;
    EXPECT_EQ(o.head.content_length, 7u);
}

TEST(RequestHead, AbsoluteFormIsReducedToOriginForm) {
    auto o = req("GET HTTPS://Mail.Contoso.com:443/owa/?a=1 HTTP/1.1\r\nHost: mail.contoso.com\r\n\r\n");
    ASSERT_EQ(o.r, result::done) << o.err.detail;
    EXPECT_EQ(o.head.target, "/owa/?a=1");
    EXPECT_EQ(o.head.authority, "Mail.Contoso.com:443");
}

TEST(RequestHead, FieldValuesAreTrimmedAndObsTextAllowed) {
    auto o = req("GET /owa/ HTTP/1.1\r\n" + H + "X-A: \t caf\xc3\xa9 \t\r\n\r\n");
    ASSERT_EQ(o.r, result::done) << o.err.detail;
    EXPECT_EQ(o.head.get("x-a"), "caf\xc3\xa9");
}

TEST(RequestHead, NeedsMoreUntilTheBlankLineThenReportsHeadSize) {
    std::string full = "GET /owa/ HTTP/1.1\r\n" + H + "\r\nGET /next";
    auto head_len = full.find("GET /next");
    for (std::size_t n = 0; n < head_len; ++n) {
        request_head h;
        parse_error e;
        EXPECT_EQ(parse_request(std::string_view(full).substr(0, n), {}, h, e), result::need_more) << n;
    }
    auto o = req(full);
    ASSERT_EQ(o.r, result::done);
    EXPECT_EQ(o.head.head_size, head_len);  // the pipelined request stays in the buffer
}

TEST(RequestHead, Limits) {
    limits lim;
    lim.max_request_line = 64;
    lim.max_head_bytes = 256;
    lim.max_fields = 3;
    auto long_line = req("GET /" + std::string(100, 'a') + " HTTP/1.1\r\n", lim);
    EXPECT_EQ(long_line.r, result::error);
    EXPECT_EQ(long_line.err.status, 414);
    auto big_head = req("GET / HTTP/1.1\r\n" + H + "X-Kerberos: " + std::string(300, 'k'), lim);
    EXPECT_EQ(big_head.r, result::error);
    EXPECT_EQ(big_head.err.status, 431);
    auto many = req("GET / HTTP/1.1\r\n" + H + "A: 1\r\nB: 2\r\nC: 3\r\n\r\n", lim);
    EXPECT_EQ(many.r, result::error);
    EXPECT_EQ(many.err.status, 431);
    // The default allows a 64 KiB Kerberos token.
    auto kerberos = req("POST /EWS/Exchange.asmx HTTP/1.1\r\n" + H + "Authorization: Negotiate " + std::string(60000, 'Y') + "\r\n\r\n");
    EXPECT_EQ(kerberos.r, result::done) << kerberos.err.detail;
}

struct resp_outcome {
    std::shared_ptr<std::string> text;
    result r;
    response_head head;
    parse_error err;
};

resp_outcome resp(const std::string& text, std::string_view method = "GET") {
    resp_outcome o;
    o.text = std::make_shared<std::string>(text);
    o.r = parse_response(*o.text, method, {}, o.head, o.err);
    return o;
}

TEST(ResponseHead, Framing) {
    auto cl = resp("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n");
    ASSERT_EQ(cl.r, result::done);
    EXPECT_EQ(cl.head.body, body_kind::length);
    EXPECT_EQ(cl.head.content_length, 12u);
    auto head = resp("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", "HEAD");
    EXPECT_EQ(head.head.body, body_kind::none);
    auto nocontent = resp("HTTP/1.1 204 No Content\r\n\r\n");
    EXPECT_EQ(nocontent.head.body, body_kind::none);
    auto cont = resp("HTTP/1.1 100 Continue\r\n\r\n");
    EXPECT_EQ(cont.head.status, 100);
    EXPECT_EQ(cont.head.body, body_kind::none);
    auto chunked = resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
    EXPECT_EQ(chunked.head.body, body_kind::chunked);
    auto close = resp("HTTP/1.1 200 OK\r\n\r\n");
    EXPECT_EQ(close.head.body, body_kind::until_close);
    EXPECT_FALSE(close.head.keep_alive);
    auto noreason = resp("HTTP/1.1 401\r\nWWW-Authenticate: NTLM\r\nContent-Length: 0\r\n\r\n");
    ASSERT_EQ(noreason.r, result::done) << noreason.err.detail;
    EXPECT_EQ(noreason.head.status, 401);
    EXPECT_EQ(noreason.head.get("www-authenticate"), "NTLM");
}

TEST(ResponseHead, BadUpstreamFramingIs502) {
    for (std::string bad : {"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                            "HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n", "HTTP/1.1 2000 OK\r\n\r\n",
                            "HTTP/1.1 200 OK\r\nX: a\nY: b\r\n\r\n", "HTTP/1.1 200 OK\r\n folded\r\n\r\n",
                            "SSH-2.0-OpenSSH_9.2\r\n\r\n", "HTTP/1.1 200 OK\r\nX : y\r\n\r\n"}) {
        auto o = resp(bad);
        EXPECT_EQ(o.r, result::error) << bad;
        EXPECT_EQ(o.err.status, 502) << bad;
    }
}

std::string decode_all(const std::string& wire, chunked_decoder& d, bool& ok, std::size_t piece = 1 << 20) {
    std::string out;
    std::size_t pos = 0;
    ok = true;
    while (pos < wire.size() && !d.done()) {
        auto avail = std::string_view(wire).substr(pos, piece);
        while (!avail.empty() && !d.done()) {
            chunked_decoder::step s;
            parse_error e;
            if (!d.feed(avail, s, e)) {
                ok = false;
                return out;
            }
            out.append(s.data);
            avail.remove_prefix(s.consumed);
            pos += s.consumed;
            if (s.consumed == 0 && s.data.empty()) break;
        }
    }
    return out;
}

TEST(Chunked, DecodesWholeAndByteByByte) {
    std::string wire = "5\r\nhello\r\nA;name=value\r\n, chunked!\r\n0\r\nX-Trailer: 1\r\n\r\n";
    for (std::size_t piece : {std::size_t(1), std::size_t(3), std::size_t(1 << 20)}) {
        chunked_decoder d;
        bool ok = false;
        EXPECT_EQ(decode_all(wire, d, ok, piece), "hello, chunked!") << piece;
        EXPECT_TRUE(ok);
        EXPECT_TRUE(d.done());
    }
}

TEST(Chunked, StopsAtTheEndLeavingPipelinedBytes) {
    std::string wire = "3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
    chunked_decoder d;
    std::string_view in(wire);
    std::size_t used = 0;
    while (!d.done()) {
        chunked_decoder::step s;
        parse_error e;
        ASSERT_TRUE(d.feed(in.substr(used), s, e));
        used += s.consumed;
    }
    EXPECT_EQ(wire.substr(used), "GET / HTTP/1.1\r\n");
}

TEST(Chunked, RefusesMalformedFraming) {
    for (std::string bad : {"x\r\n", "\r\n", "5 \r\nhello\r\n", "5\nhello\r\n", "5\r\nhelloX\r\n",
                            "5\r\nhello\n0\r\n\r\n", "1234567890abcdef0\r\n", "-1\r\n", "0x5\r\n",
                            "5;a\x01\r\nhello\r\n", "0\r\nX: y\n\r\n", "5\r\nhello\r\r\n"}) {
        chunked_decoder d;
        bool ok = true;
        decode_all(bad + "0\r\n\r\n", d, ok);
        EXPECT_FALSE(ok) << bad;
    }
}

}  // namespace
