// The default lab (front-end -> back-end -> Exchange) through the offline explain engine:
// every Exchange service reaches Exchange across both tiers, everything else stops where
// and why it should.
#include <gtest/gtest.h>

#include <cctype>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include "dmz/topology/explain.hpp"
#include "dmz/topology/topology.hpp"

namespace {

using namespace dmz;
using topology::outcome;

std::string dump(const rules::diagnostics& d) {
    std::string out;
    for (auto& x : d)
        out += "  " + x.where.to_string() + " " + x.code + " " + x.message + "\n";
    return out;
}

std::string describe(const topology::explanation& ex) {
    std::string out = std::string(topology::to_string(ex.result)) + " at '" + ex.stopped_at +
                      "': " + ex.reason + "\n";
    for (auto& t : ex.tiers) {
        out += "  [" + t.instance + "] " + t.listener + " client " + t.client + " -> " +
               t.matched_rule + " " + t.action + ": " + t.decision.reason + "\n";
        for (auto& e : t.decision.trace)
            out += "      " + e.rule + " " + rules::to_string(e.result) + " " + e.condition + " " +
                   e.reason + "\n";
    }
    return out;
}

class TwoTier : public ::testing::Test {
protected:
    static void SetUpTestSuite() {
        auto r = topology::load(DMZ_SOURCE_DIR "/topology/exchange-two-tier.toml");
        load_ok_ = r.parsed && r.topo && !rules::has_errors(r.diags);
        load_diags_ = dump(r.diags);
        if (r.topo)
            topo_ = new topology::topology(std::move(*r.topo));
    }
    static void TearDownTestSuite() {
        delete topo_;
        topo_ = nullptr;
    }
    void SetUp() override { ASSERT_TRUE(load_ok_ && topo_) << load_diags_; }

    static topology::probe web(const std::string& method, const std::string& url) {
        topology::probe p;
        p.from = *rules::ip_address::parse("127.10.0.100");
        p.method = method;
        p.url = url;
        return p;
    }
    static topology::probe smtp(const std::string& rcpt, const std::string& user = "") {
        topology::probe p;
        p.from = *rules::ip_address::parse("127.10.0.100");
        p.smtp = true;
        p.mail_from = "someone@example.org";
        p.rcpt = rcpt;
        p.user = user;
        return p;
    }
    static topology::explanation run(const topology::probe& p) {
        return topology::explain(*topo_, p);
    }

    static inline topology::topology* topo_ = nullptr;
    static inline bool load_ok_ = false;
    static inline std::string load_diags_;
};

TEST_F(TwoTier, LoadsWithoutDiagnostics) {
    auto r = topology::load(DMZ_SOURCE_DIR "/topology/exchange-two-tier.toml");
    EXPECT_TRUE(r.diags.empty()) << dump(r.diags);
    auto& t = *topo_;
    EXPECT_EQ(t.name, "exchange-two-tier");
    EXPECT_EQ(t.mx, "mail.contoso.com");
    ASSERT_TRUE(t.find_instance("front-end"));
    ASSERT_TRUE(t.find_instance("back-end"));
    ASSERT_TRUE(t.find_host("exchange"));
    EXPECT_TRUE(t.find_instance("front-end")->policy);
    EXPECT_TRUE(t.find_instance("back-end")->policy);
    EXPECT_EQ(t.network_of(*rules::ip_address::parse("127.10.0.100")), "External");
    EXPECT_EQ(t.network_of(*rules::ip_address::parse("127.20.0.10")), "Perimeter");
    EXPECT_EQ(t.node_at(*rules::ip_address::parse("127.30.0.50")), "exchange");
    EXPECT_EQ(t.names.at("autodiscover.contoso.com"), "front-end");
    // Derived configs: listeners bound on legs, targets resolved to addresses.
    auto& fe = t.find_instance("front-end")->policy->config();
    auto* web = fe.find_listener("web");
    ASSERT_TRUE(web);
    ASSERT_EQ(web->bind.size(), 1u);
    EXPECT_EQ(web->bind[0].to_string(), "127.10.0.10:443");
    ASSERT_FALSE(fe.rules.empty());
    ASSERT_TRUE(fe.rules[0].to && fe.rules[0].to->address);
    EXPECT_EQ(fe.rules[0].to->address->to_string(), "127.20.0.20");
}

/// Parameter names for test listings (CTest names): readable and free of characters that
/// need quoting.
std::string safe_name(std::string s) {
    for (auto& ch : s)
        if (!std::isalnum(static_cast<unsigned char>(ch)) &&
            std::string_view("/.-_:%?=&@~*+,!").find(ch) == std::string_view::npos)
            ch = '_';
    return s.empty() ? "empty" : s;
}

struct service_case {
    const char* method;
    const char* url;
    const char* rule; ///< the expanded rule both tiers match
};

void PrintTo(const service_case& c, std::ostream* os) {
    *os << safe_name(std::string(c.method) + "_" + c.url);
}

class TwoTierServices : public TwoTier, public ::testing::WithParamInterface<service_case> {};

TEST_P(TwoTierServices, ReachExchangeThroughBothTiers) {
    auto& c = GetParam();
    auto ex = run(web(c.method, c.url));
    ASSERT_EQ(ex.result, outcome::ok) << c.method << " " << c.url << "\n" << describe(ex);
    EXPECT_TRUE(ex.allowed());
    EXPECT_EQ(ex.reached, "exchange");
    EXPECT_TRUE(ex.redirect.empty());
    EXPECT_FALSE(ex.with_test_rules); // only computed for rule faults
    ASSERT_EQ(ex.tiers.size(), 2u) << describe(ex);

    auto& fe = ex.tiers[0];
    EXPECT_EQ(fe.instance, "front-end");
    EXPECT_EQ(fe.listener, "web");
    EXPECT_EQ(fe.address, "127.10.0.10:443");
    EXPECT_EQ(fe.client, "127.10.0.100");
    EXPECT_EQ(fe.matched_rule, c.rule);
    EXPECT_EQ(fe.action, "allow");
    EXPECT_NE(fe.target.find("back-end 127.20.0.20:443"), std::string::npos) << fe.target;

    auto& be = ex.tiers[1];
    EXPECT_EQ(be.instance, "back-end");
    EXPECT_EQ(be.address, "127.20.0.20:443");
    EXPECT_EQ(be.transport_source, "127.20.0.10"); // the front-end's Perimeter leg
    EXPECT_EQ(be.client, "127.10.0.100");          // ...but it judges the real client
    EXPECT_NE(be.client_note.find("X-Forwarded-For from trusted front-end"), std::string::npos)
        << be.client_note;
    EXPECT_EQ(be.matched_rule, c.rule);
    EXPECT_EQ(be.action, "allow");
    EXPECT_NE(be.target.find("exchange 127.30.0.50:443"), std::string::npos) << be.target;
}

INSTANTIATE_TEST_SUITE_P(
    Exchange, TwoTierServices,
    ::testing::Values(
        service_case{"GET", "https://mail.contoso.com/owa/", "Exchange/owa"},
        service_case{"POST", "https://mail.contoso.com/owa/auth.owa", "Exchange/owa"},
        service_case{
            "OPTIONS",
            "https://mail.contoso.com/"
            "Microsoft-Server-ActiveSync?Cmd=Ping&User=alice&DeviceId=d1&DeviceType=iPhone",
            "Exchange/activesync"},
        service_case{
            "POST",
            "https://mail.contoso.com/"
            "Microsoft-Server-ActiveSync?Cmd=Ping&User=alice&DeviceId=d1&DeviceType=iPhone",
            "Exchange/activesync"},
        service_case{"RPC_IN_DATA", "https://mail.contoso.com/rpc/rpcproxy.dll?ex01:6001",
                     "Exchange/outlook_anywhere"},
        service_case{"RPC_OUT_DATA", "https://mail.contoso.com/rpc/rpcproxy.dll?ex01:6001",
                     "Exchange/outlook_anywhere"},
        service_case{"POST", "https://mail.contoso.com/mapi/emsmdb", "Exchange/mapi"},
        service_case{"POST", "https://mail.contoso.com/EWS/Exchange.asmx", "Exchange/ews"},
        service_case{"POST", "https://autodiscover.contoso.com/autodiscover/autodiscover.xml",
                     "Exchange/autodiscover"},
        service_case{"POST", "https://mail.contoso.com/Autodiscover/Autodiscover.xml",
                     "Exchange/autodiscover"},
        service_case{"GET", "https://mail.contoso.com/OAB/x", "Exchange/oab"},
        service_case{"GET", "https://MAIL.contoso.com:443/owa/", "Exchange/owa"}));

TEST_F(TwoTier, EcpIsARuleFaultThatTheTestRuleTellsApart) {
    auto ex = run(web("GET", "https://mail.contoso.com/ecp/"));
    EXPECT_EQ(ex.result, outcome::rule_fault) << describe(ex);
    EXPECT_EQ(ex.stopped_at, "front-end");
    EXPECT_TRUE(ex.reached.empty());
    ASSERT_EQ(ex.tiers.size(), 1u);
    EXPECT_EQ(ex.tiers[0].matched_rule, "default deny");
    EXPECT_EQ(ex.tiers[0].action, "deny");
    EXPECT_EQ(ex.tiers[0].decision.why, rules::fault_class::no_rule_matched);
    ASSERT_TRUE(ex.with_test_rules);
    EXPECT_EQ(*ex.with_test_rules, outcome::ok);
    EXPECT_EQ(ex.with_test_rules_reached, "exchange");

    // Asking for the test rules directly: both tiers' test rules carry it through.
    auto p = web("GET", "https://mail.contoso.com/ecp/");
    p.with_test_rules = true;
    auto t = run(p);
    EXPECT_EQ(t.result, outcome::ok) << describe(t);
    ASSERT_EQ(t.tiers.size(), 2u);
    EXPECT_EQ(t.tiers[0].matched_rule, "Test rule");
    EXPECT_EQ(t.tiers[1].matched_rule, "Test rule");
}

TEST_F(TwoTier, WrongMethodIsARuleFault) {
    auto ex = run(web("GET", "https://mail.contoso.com/rpc/rpcproxy.dll"));
    EXPECT_EQ(ex.result, outcome::rule_fault) << describe(ex);
    EXPECT_EQ(ex.stopped_at, "front-end");
    ASSERT_EQ(ex.tiers.size(), 1u);
    bool saw = false;
    for (auto& e : ex.tiers[0].decision.trace)
        if (e.rule == "Exchange/outlook_anywhere") {
            saw = true;
            EXPECT_EQ(e.result, rules::examined_rule::outcome::failed);
            EXPECT_EQ(e.condition, "methods");
        }
    EXPECT_TRUE(saw) << describe(ex);
}

TEST_F(TwoTier, PathEscapesNeverReachExchange) {
    for (const char* url :
         {"https://mail.contoso.com/owa/../ecp/", "https://mail.contoso.com/owa/%2e%2e/ecp/",
          "https://mail.contoso.com/owa/%252e%252e/ecp/",
          "https://mail.contoso.com/owa/..;/ecp/"}) {
        auto ex = run(web("GET", url));
        EXPECT_FALSE(ex.allowed()) << url << "\n" << describe(ex);
        EXPECT_EQ(ex.result, outcome::rule_fault) << url;
        EXPECT_EQ(ex.stopped_at, "front-end") << url;
        ASSERT_EQ(ex.tiers.size(), 1u) << url;
        EXPECT_FALSE(ex.tiers[0].decision.path.safe()) << url;
        // Not even the test rule lets an escaping path through.
        ASSERT_TRUE(ex.with_test_rules) << url;
        EXPECT_NE(*ex.with_test_rules, outcome::ok) << url;
    }
}

TEST_F(TwoTier, ProxyShellShapeIsRefused) {
    auto ex = run(
        web("GET", "https://mail.contoso.com/autodiscover/autodiscover.json?@x.com/Powershell"));
    EXPECT_EQ(ex.result, outcome::rule_fault) << describe(ex);
    EXPECT_EQ(ex.stopped_at, "front-end");
    EXPECT_NE(ex.reason.find("ProxyShell"), std::string::npos) << ex.reason;
}

TEST_F(TwoTier, UnknownNameIsANetworkFault) {
    auto ex = run(web("GET", "https://nosuch.contoso.com/owa/"));
    EXPECT_EQ(ex.result, outcome::network_fault) << describe(ex);
    EXPECT_EQ(ex.stopped_at, "client");
    EXPECT_TRUE(ex.tiers.empty());
    EXPECT_NE(ex.reason.find("does not resolve"), std::string::npos) << ex.reason;
    EXPECT_FALSE(ex.with_test_rules);
}

TEST_F(TwoTier, NothingListeningIsANetworkFault) {
    auto ex = run(web("GET", "https://mail.contoso.com:8443/owa/"));
    EXPECT_EQ(ex.result, outcome::network_fault) << describe(ex);
    EXPECT_NE(ex.reason.find("nothing listens"), std::string::npos) << ex.reason;
}

TEST_F(TwoTier, PlainHttpRedirectsToHttpsFirst) {
    auto ex = run(web("GET", "http://mail.contoso.com/owa/"));
    EXPECT_FALSE(ex.redirect.empty());
    EXPECT_NE(ex.redirect.find("https://mail.contoso.com/owa/"), std::string::npos) << ex.redirect;
    EXPECT_EQ(ex.result, outcome::ok) << describe(ex);
    EXPECT_EQ(ex.reached, "exchange");
    ASSERT_EQ(ex.tiers.size(), 2u);
    EXPECT_EQ(ex.tiers[0].listener, "web");
}

TEST_F(TwoTier, BadUrlThrows) {
    EXPECT_THROW(run(web("GET", "mail.contoso.com/owa/")), std::invalid_argument);
    EXPECT_THROW(run(web("GET", "ftp://mail.contoso.com/")), std::invalid_argument);
    EXPECT_THROW(run(web("GET", "https://mail.contoso.com:99999/")), std::invalid_argument);
    EXPECT_THROW(run(web("GET", "https:///owa/")), std::invalid_argument);
}

TEST_F(TwoTier, SmtpToAnAcceptedDomainReachesExchange) {
    auto ex = run(smtp("user@contoso.com"));
    EXPECT_EQ(ex.result, outcome::ok) << describe(ex);
    EXPECT_EQ(ex.reached, "exchange");
    EXPECT_NE(ex.reason.find("frontend-transport"), std::string::npos)
        << ex.reason; // port 25, not Hub's 2525
    ASSERT_EQ(ex.tiers.size(), 2u);
    EXPECT_EQ(ex.tiers[0].listener, "smtp");
    EXPECT_EQ(ex.tiers[0].address, "127.10.0.10:25");
    EXPECT_EQ(ex.tiers[0].matched_rule, "Exchange/smtp");
    EXPECT_EQ(ex.tiers[0].decision.smtp_disposition, "submit");
    EXPECT_EQ(ex.tiers[1].transport_source, "127.20.0.10");
    EXPECT_EQ(ex.tiers[1].client, "127.10.0.100");
    EXPECT_NE(ex.tiers[1].client_note.find("PROXY protocol v2"), std::string::npos)
        << ex.tiers[1].client_note;
    EXPECT_EQ(ex.tiers[1].decision.smtp_disposition, "submit");
}

TEST_F(TwoTier, AnonymousRelayIsARuleFault) {
    auto ex = run(smtp("user@fabrikam.com"));
    EXPECT_EQ(ex.result, outcome::rule_fault) << describe(ex);
    EXPECT_EQ(ex.stopped_at, "front-end");
    EXPECT_NE(ex.reason.find("550 5.7.1"), std::string::npos) << ex.reason;
    ASSERT_EQ(ex.tiers.size(), 1u);
    // The test rule is a web rule: it cannot make relaying work.
    ASSERT_TRUE(ex.with_test_rules);
    EXPECT_EQ(*ex.with_test_rules, outcome::rule_fault);

    for (const char* trick : {"a%fabrikam.com@contoso.com", "fabrikam.com!a@contoso.com",
                              "@fabrikam.com:a@contoso.com"}) {
        auto t = run(smtp(trick, "alice"));
        EXPECT_EQ(t.result, outcome::rule_fault) << trick << "\n" << describe(t);
    }
}

TEST_F(TwoTier, AuthenticatedUserRelays) {
    auto ex = run(smtp("user@fabrikam.com", "alice"));
    EXPECT_EQ(ex.result, outcome::ok) << describe(ex);
    EXPECT_EQ(ex.reached, "exchange");
    ASSERT_EQ(ex.tiers.size(), 2u);
    EXPECT_EQ(ex.tiers[0].decision.smtp_disposition, "relay");
    EXPECT_EQ(ex.tiers[1].decision.smtp_disposition, "relay");
}

TEST_F(TwoTier, ClientsInsideAreJudgedByTheirNetwork) {
    // From the DMZ the name resolves to the front-end's Perimeter leg, where nothing listens.
    auto p = web("GET", "https://mail.contoso.com/owa/");
    p.from = *rules::ip_address::parse("127.20.0.100");
    auto ex = run(p);
    EXPECT_EQ(ex.result, outcome::network_fault) << describe(ex);
    EXPECT_NE(ex.reason.find("nothing listens on 127.20.0.10:443"), std::string::npos) << ex.reason;
    // From the LAN the public name has no address at all.
    p.from = *rules::ip_address::parse("127.30.0.100");
    auto in = run(p);
    EXPECT_EQ(in.result, outcome::network_fault) << describe(in);
    EXPECT_NE(in.reason.find("no address on the client's network Internal"), std::string::npos)
        << in.reason;
}

TEST(Shift, MovesEveryAddressOfTheLabAndWhatIsDerivedFromThem) {
    topology::load_settings ls;
    ls.shift = 100;
    auto r = topology::load(DMZ_SOURCE_DIR "/topology/exchange-two-tier.toml", ls);
    ASSERT_TRUE(r.topo && !rules::has_errors(r.diags)) << dump(r.diags);
    auto& t = *r.topo;
    EXPECT_EQ(t.network_of(*rules::ip_address::parse("127.110.0.100")), "External");
    EXPECT_EQ(t.network_of(*rules::ip_address::parse("127.120.0.10")), "Perimeter");
    EXPECT_EQ(t.network_of(*rules::ip_address::parse("127.20.0.10")), "External")
        << "the default block is left";
    EXPECT_EQ(t.node_at(*rules::ip_address::parse("127.130.0.50")), "exchange");
    auto& fe = t.find_instance("front-end")->policy->config();
    EXPECT_EQ(fe.find_listener("web")->bind.at(0).to_string(), "127.110.0.10:443");
    ASSERT_TRUE(fe.rules.at(0).to && fe.rules[0].to->address && fe.rules[0].to->source);
    EXPECT_EQ(fe.rules[0].to->address->to_string(), "127.120.0.20");
    EXPECT_EQ(fe.rules[0].to->source->to_string(), "127.120.0.10");
    auto& be = t.find_instance("back-end")->policy->config();
    EXPECT_EQ(be.rules.at(0).to->address->to_string(), "127.130.0.50");

    topology::probe p;
    p.from = *rules::ip_address::parse("127.110.0.100");
    p.url = "https://mail.contoso.com/owa/";
    auto ex = topology::explain(t, p);
    EXPECT_EQ(ex.result, outcome::ok) << describe(ex);
}

TEST(Shift, AnAddressPushedOutOf127Slash8IsAnError) {
    topology::load_settings ls;
    ls.shift = 230; // 127.30.0.50 would become 127.260.0.50
    auto r = topology::load(DMZ_SOURCE_DIR "/topology/exchange-two-tier.toml", ls);
    ASSERT_TRUE(rules::has_errors(r.diags));
    EXPECT_NE(dump(r.diags).find("a shift of 230 moves 127.30.0.0/16 outside 127.0.0.0/8"),
              std::string::npos)
        << dump(r.diags);
    EXPECT_NE(dump(r.diags).find("a shift of 230 moves 127.30.0.50 outside 127.0.0.0/8"),
              std::string::npos)
        << dump(r.diags);
}

} // namespace
