// The head writer: what goes on toward the upstream and back toward the client.
#include <gtest/gtest.h>

#include <string>
#include <string_view>

#include "dmz/proxy/http/parser.hpp"
#include "http/head_writer.hpp"

using namespace dmz::http;

namespace {

// The head's views point into `text`: a literal or a string that outlives the head (a
// temporary std::string would be freed before the head is used; ASan found it).
request_head parse(std::string_view text) {
    request_head h;
    parse_error err;
    EXPECT_EQ(parse_request(text, {}, h, err), result::done) << err.code << ": " << err.detail;
    return h;
}

TEST(HeadWriter, DropsHopByHopAndWritesViaAndForwarding) {
    std::string text =
        "GET /owa/?a=1 HTTP/1.1\r\nHost: Mail.Contoso.com\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\n"
        "Via: 1.1 edge\r\nX-Forwarded-For: 6.6.6.6\r\nKeep-Alive: 5\r\nAccept: */*\r\n\r\n";
    auto h = parse(text);
    request_rewrite rw;
    rw.path = "/owa/";
    rw.query = "a=1";
    rw.host = h.host;
    rw.tier = "front-end";
    rw.forwarded = true;
    rw.client = "2001:db8::1";
    rw.client_v6 = true;
    rw.tls = true;
    bool bound = false;
    auto out = write_request_head(h, rw, bound);
    EXPECT_EQ(out.rfind("GET /owa/?a=1 HTTP/1.1\r\nHost: Mail.Contoso.com\r\n", 0), 0u) << out;
    EXPECT_EQ(out.find("X-Secret"), std::string::npos) << out;  // named in Connection
    EXPECT_EQ(out.find("Keep-Alive"), std::string::npos) << out;
    EXPECT_EQ(out.find("6.6.6.6"), std::string::npos) << out;  // the client's own claim never goes on
    EXPECT_NE(out.find("Accept: */*\r\n"), std::string::npos) << out;
    EXPECT_NE(out.find("Via: 1.1 edge, 1.1 front-end\r\n"), std::string::npos) << out;
    EXPECT_NE(out.find("X-Forwarded-For: 2001:db8::1\r\n"), std::string::npos) << out;
    EXPECT_NE(out.find("Forwarded: for=\"[2001:db8::1]\";proto=https\r\n"), std::string::npos) << out;
    EXPECT_FALSE(bound);
    EXPECT_EQ(out.substr(out.size() - 4), "\r\n\r\n");
}

TEST(HeadWriter, AuthorizationFollowsDelegation) {
    auto ntlm = parse("POST /rpc/rpcproxy.dll HTTP/1.1\r\nHost: m\r\nAuthorization: NTLM TlRMTVNTUAAB\r\nContent-Length: 3\r\n\r\n");
    request_rewrite rw;
    rw.path = "/rpc/rpcproxy.dll";
    rw.host = "m";
    rw.tier = "t";
    bool bound = false;
    auto pass = write_request_head(ntlm, rw, bound);
    EXPECT_NE(pass.find("Authorization: NTLM"), std::string::npos);
    EXPECT_TRUE(bound) << "NTLM binds the upstream connection to the client's";
    EXPECT_NE(pass.find("Content-Length: 3\r\n"), std::string::npos);

    rw.delegation = dmz::rules::delegation::basic;  // forwards only Basic this tier validated
    rw.validated_basic = true;
    bound = false;
    EXPECT_EQ(write_request_head(ntlm, rw, bound).find("Authorization"), std::string::npos);
    EXPECT_FALSE(bound);

    auto basic = parse("GET / HTTP/1.1\r\nHost: m\r\nAuthorization: Basic dTpw\r\n\r\n");
    EXPECT_NE(write_request_head(basic, rw, bound).find("Authorization: Basic dTpw"), std::string::npos);
    rw.session_replaces_authorization = true;
    rw.session_authorization = "Basic c2Vzc2lvbg==";
    auto out = write_request_head(basic, rw, bound);
    EXPECT_EQ(out.find("dTpw"), std::string::npos) << out;
    EXPECT_NE(out.find("Authorization: Basic c2Vzc2lvbg==\r\n"), std::string::npos) << out;
    rw.delegation = dmz::rules::delegation::none;
    rw.session_replaces_authorization = false;
    rw.session_authorization.clear();
    EXPECT_EQ(write_request_head(basic, rw, bound).find("Authorization"), std::string::npos);
}

TEST(HeadWriter, CookiesOfThisTierAndEcpTokensStayHere) {
    auto h = parse("GET /ecp/ HTTP/1.1\r\nHost: m\r\nCookie: a=1; DmzSession=xyz; SecurityToken=t; b=2\r\n\r\n");
    request_rewrite rw;
    rw.path = "/ecp/";
    rw.host = "m";
    rw.tier = "t";
    rw.session_cookie = "DmzSession";
    rw.strip_security_token = true;
    bool bound = false;
    auto out = write_request_head(h, rw, bound);
    EXPECT_NE(out.find("Cookie: a=1; b=2\r\n"), std::string::npos) << out;
    EXPECT_EQ(without_cookie("x=1", "x"), "");
    EXPECT_EQ(cookie_value(h, "DmzSession"), "xyz");
}

TEST(HeadWriter, ResponseFraming) {
    response_head r;
    parse_error err;
    std::string text = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\nVia: 1.1 exch\r\n\r\n";
    ASSERT_EQ(parse_response(text, "POST", {}, r, err), result::done);
    response_rewrite rw;
    rw.tier = "back-end";
    rw.request_method = "POST";
    rw.chunk_to_client = true;
    rw.set_cookie = "S=1";
    auto out = write_response_head(r, rw);
    EXPECT_EQ(out, "HTTP/1.1 200 OK\r\nVia: 1.1 exch, 1.1 back-end\r\nSet-Cookie: S=1\r\nTransfer-Encoding: chunked\r\n\r\n");
    rw.http10 = true;
    rw.chunk_to_client = false;
    rw.close_client = true;
    rw.set_cookie = {};
    out = write_response_head(r, rw);
    EXPECT_EQ(out, "HTTP/1.0 200 OK\r\nVia: 1.1 exch, 1.1 back-end\r\nConnection: close\r\n\r\n");
}

TEST(HeadWriter, SmallHelpers) {
    EXPECT_EQ(host_without_port("Mail.Contoso.com:443"), "mail.contoso.com");
    EXPECT_EQ(host_without_port("[::1]:443"), "::1");
    EXPECT_TRUE(via_names("1.0 a, 1.1 front-end (dmzproxy)", "front-end"));
    EXPECT_FALSE(via_names("1.1 front-ends", "front-end"));
    EXPECT_EQ(hex(255), "ff");
    EXPECT_STREQ(reason_phrase(508), "Loop Detected");
}

}  // namespace
