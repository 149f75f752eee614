// The Exchange template's guards on request heads.
#include <gtest/gtest.h>

#include "dmz/rules/guards.hpp"

using namespace dmz::rules;

namespace {

normalized_target at(std::string path, std::string decoded = {}) {
    normalized_target t;
    t.path = path;
    t.decoded = decoded.empty() ? path : decoded;
    return t;
}

TEST(ExchangeGuard, RefusesAttackShapesOnlyUnderTheTemplate) {
    rule r;
    r.name = "OWA";
    r.exchange_guards = true;
    auto t = at("/owa/");
    exchange_guard g(r, t);
    g.cookie("a=1");
    EXPECT_FALSE(g.refusal());
    g.cookie("X-BEResource=localhost/owa/auth.js~1942062522");
    auto f = g.refusal();
    ASSERT_TRUE(f);
    EXPECT_EQ(f->cls, fault_class::rule_denied);
    EXPECT_EQ(f->status, 403);
    EXPECT_EQ(f->side, fault_side::tier);
    EXPECT_EQ(f->rule, "OWA");
    EXPECT_NE(f->detail.find("ProxyLogon"), std::string::npos);

    r.exchange_guards = false;
    EXPECT_FALSE(g.refusal()) << "a rule without the template refuses nothing here";
}

TEST(ExchangeGuard, RpsCatAndProxyToken) {
    rule r;
    r.name = "ECP";
    r.exchange_guards = true;
    auto uri = at("/ecp/x", "/ecp/x?X-Rps-CAT=abc");
    exchange_guard a(r, uri);
    ASSERT_TRUE(a.refusal());
    EXPECT_NE(a.refusal()->detail.find("in the URI"), std::string::npos);

    auto ecp = at("/ecp/default.aspx");
    exchange_guard b(r, ecp);
    b.cookie("SecurityToken=1");
    EXPECT_FALSE(b.refusal());
    EXPECT_TRUE(b.strip_security_token());
    b.rps_cat_field();
    ASSERT_TRUE(b.refusal());
    EXPECT_NE(b.refusal()->detail.find("X-Rps-CAT from a client"), std::string::npos);

    auto owa = at("/owa/");
    exchange_guard c(r, owa);
    c.cookie("SecurityToken=1");
    EXPECT_FALSE(c.strip_security_token()) << "only ECP's token is ProxyToken's";
}

TEST(Fault, ClassesCarrySideAndRetryability) {
    auto f = make_fault(fault_class::upstream_connect, 502, "refused (10061)");
    EXPECT_EQ(f.side, fault_side::upstream);
    EXPECT_TRUE(f.retryable);
    EXPECT_TRUE(f);
    EXPECT_STREQ(to_string(f.cls), "upstream-connect");
    EXPECT_EQ(make_fault(fault_class::bad_request, 400, "").side, fault_side::client);
    EXPECT_FALSE(make_fault(fault_class::rule_denied, 403, "").retryable);
    EXPECT_FALSE(fault{});
    EXPECT_STREQ(to_string(fault_class::none), "");
}

}  // namespace
