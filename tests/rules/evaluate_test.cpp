// First-match evaluation over what is known of a transaction: verdict, fault, matched rule
// with its position, the trace of earlier rules, three-valued conditions, SMTP relay policy.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "dmz/rules/config.hpp"
#include "support/test_text.hpp"
#include "rules/policy_preamble.hpp"
#include "dmz/rules/evaluate.hpp"

namespace {

using namespace dmz::rules;
using namespace dmz::test;
using outcome = examined_rule::outcome;


// Networks, listeners, users and groups every policy below shares.
const std::string preamble = dmz::test::policy_preamble;

policy make_policy(const std::string& rules_text) {
    auto r = load_instance_config_text(preamble + rules_text, "/tmp/x/policy.toml");
    EXPECT_TRUE(r.diags.empty()) << dump(r.diags);
    EXPECT_TRUE(r.config);
    return policy(r.config.value_or(instance_config{}));
}

ip_address ip(const char* s) {
    return ip_address::parse(s).value();
}

facts web_request(const char* target, const char* method = "GET",
                  const char* client = "127.10.0.100") {
    facts f;
    f.listener = "web";
    f.client = ip(client);
    f.host = "mail.contoso.com";
    f.sni = "mail.contoso.com";
    f.method = method;
    f.target = target;
    f.who = identity::anonymous;
    return f;
}

facts as_user(facts f, const std::string& name, std::vector<std::string> groups) {
    f.who = identity::authenticated;
    f.user = name;
    f.groups = std::move(groups);
    return f;
}

std::string trace_of(const decision& d) {
    std::string out;
    for (auto& e : d.trace)
        out +=
            "  " + e.rule + " " + to_string(e.result) + " " + e.condition + ": " + e.reason + "\n";
    return out;
}

constexpr const char* upstream = "target = { address = \"10.0.0.5\", port = 80 }\n";

TEST(Evaluate, FirstMatchWins) {
    auto p = make_policy(std::string(R"(
[[rules]]
name = "Block private"
action = "deny"
paths = ["/owa/private"]

[[rules]]
name = "OWA"
action = "allow"
paths = ["/owa"]
)") + upstream + R"(
[[rules]]
name = "Deny OWA"
action = "deny"
paths = ["/owa"]
)");
    auto d = p.evaluate(web_request("/owa/private/x"));
    EXPECT_EQ(d.result, verdict::deny);
    EXPECT_EQ(d.why, fault_class::rule_denied);
    EXPECT_EQ(d.rule_name, "Block private");
    ASSERT_TRUE(d.matched);
    EXPECT_EQ(d.matched->name, "Block private");
    EXPECT_EQ(d.to(), nullptr);

    auto a = p.evaluate(web_request("/OWA/inbox"));
    EXPECT_EQ(a.result, verdict::allow) << trace_of(a);
    EXPECT_EQ(a.why, fault_class::none);
    EXPECT_EQ(a.rule_name, "OWA");
    EXPECT_EQ(a.where.file, "/tmp/x/policy.toml");
    EXPECT_EQ(a.where.line, 36); // the OWA rule's [[rules]] header
    ASSERT_NE(a.to(), nullptr);
    EXPECT_EQ(a.to()->port, 80);
    EXPECT_EQ(a.path.path, "/OWA/inbox");
    ASSERT_EQ(a.trace.size(), 2u);
    EXPECT_EQ(a.trace[0].result, outcome::failed);
    EXPECT_EQ(a.trace[1].result, outcome::matched);
    // Later rules are not examined.
    for (auto& e : a.trace)
        EXPECT_NE(e.rule, "Deny OWA");

    // "/owa/privatex" is not under "/owa/private": segment boundaries.
    EXPECT_EQ(p.evaluate(web_request("/owa/privatex")).rule_name, "OWA");
}

TEST(Evaluate, DefaultDeny) {
    auto p = make_policy(std::string(R"(
[[rules]]
name = "OWA"
action = "allow"
paths = ["/owa"]
)") + upstream);
    auto d = p.evaluate(web_request("/ecp/"));
    EXPECT_EQ(d.result, verdict::deny);
    EXPECT_EQ(d.why, fault_class::no_rule_matched);
    EXPECT_EQ(d.matched, nullptr);
    EXPECT_EQ(d.rule_name, "default deny");
    EXPECT_EQ(d.to(), nullptr);
    ASSERT_EQ(d.trace.size(), 1u);
    EXPECT_EQ(d.trace[0].condition, "paths");
    EXPECT_STREQ(to_string(d.why), "no-rule-matched");

    // An empty policy denies everything; an unknown listener too.
    auto empty = make_policy("");
    EXPECT_EQ(empty.evaluate(web_request("/owa/")).why, fault_class::no_rule_matched);
    auto f = web_request("/owa/");
    f.listener = "nope";
    auto u = p.evaluate(f);
    EXPECT_EQ(u.result, verdict::deny);
    EXPECT_NE(u.reason.find("nope"), std::string::npos);
}

TEST(Evaluate, DisabledRulesAreSkippedTestRulesOnlyOnRequest) {
    auto p = make_policy(std::string(R"(
[[rules]]
name = "Off"
enabled = false
action = "allow"
)") + upstream + R"(
[[rules]]
name = "Test rule"
test = true
enabled = false
action = "allow"
)" + upstream + R"(
[[rules]]
name = "OWA"
action = "allow"
paths = ["/owa"]
)" + upstream);
    auto d = p.evaluate(web_request("/ecp/"));
    EXPECT_EQ(d.why, fault_class::no_rule_matched);
    ASSERT_EQ(d.trace.size(), 3u) << trace_of(d);
    EXPECT_EQ(d.trace[0].result, outcome::skipped_disabled);
    EXPECT_EQ(d.trace[0].reason, "disabled");
    EXPECT_EQ(d.trace[1].result, outcome::skipped_disabled);
    EXPECT_EQ(d.trace[1].reason, "disabled (test rule)");

    evaluate_options with_test;
    with_test.enable_test_rules = true;
    auto t = p.evaluate(web_request("/ecp/"), with_test);
    EXPECT_EQ(t.result, verdict::allow) << trace_of(t);
    EXPECT_EQ(t.rule_name, "Test rule");
    // A disabled rule that is not the test rule stays off.
    EXPECT_EQ(t.trace[0].result, outcome::skipped_disabled);
}

TEST(Evaluate, TraceNamesTheFirstFailingConditionOfEachEarlierRule) {
    auto p = make_policy(std::string(R"(
[[rules]]
name = "by listener"
action = "deny"
listeners = ["admin"]

[[rules]]
name = "by source"
action = "deny"
from = ["Internal"]

[[rules]]
name = "by host"
action = "deny"
public_names = ["other.contoso.com", "*.fabrikam.com"]

[[rules]]
name = "by path"
action = "deny"
paths = ["/ecp"]

[[rules]]
name = "by method"
action = "deny"
methods = ["POST"]

[[rules]]
name = "by user"
action = "deny"
users = ["alice"]
groups = ["admins"]

[[rules]]
name = "SMTP"
kind = "server"
action = "deny"

[[rules]]
name = "everything"
action = "allow"
from = ["External"]
)") + upstream);
    // Each rule fails on one condition only, and its earlier conditions hold.
    auto d = p.evaluate(as_user(web_request("/owa/"), "bob", {"staff"}));
    EXPECT_EQ(d.result, verdict::allow);
    EXPECT_EQ(d.rule_name, "everything");
    struct want {
        const char* rule;
        outcome result;
        const char* condition;
        const char* reason_has;
    };
    std::vector<want> wants = {
        {"by listener", outcome::failed, "listener", "listener 'web' is not one of: admin"},
        {"by source", outcome::failed, "from",
         "client 127.10.0.100 (network External) is not in: Internal"},
        {"by host", outcome::failed, "public_names", "host 'mail.contoso.com'"},
        {"by path", outcome::failed, "paths", "path '/owa/' is not under: /ecp"},
        {"by method", outcome::failed, "methods", "method GET"},
        {"by user", outcome::failed, "users", "user 'bob'"},
        {"SMTP", outcome::not_applicable, "", "server rule"},
        {"everything", outcome::matched, "", ""},
    };
    ASSERT_EQ(d.trace.size(), wants.size()) << trace_of(d);
    for (std::size_t i = 0; i < wants.size(); ++i) {
        auto& e = d.trace[i];
        EXPECT_EQ(e.rule, wants[i].rule);
        EXPECT_EQ(e.result, wants[i].result) << e.rule;
        EXPECT_EQ(e.condition, wants[i].condition) << e.rule;
        EXPECT_NE(e.reason.find(wants[i].reason_has), std::string::npos)
            << e.rule << ": " << e.reason;
        EXPECT_EQ(e.where.file, "/tmp/x/policy.toml");
        EXPECT_GT(e.where.line, 30) << e.rule;
    }
    // Each entry carries its own rule's position, in order.
    for (std::size_t i = 1; i < d.trace.size(); ++i)
        EXPECT_GT(d.trace[i].where.line, d.trace[i - 1].where.line);
}

TEST(Evaluate, HostWildcardCoversOneLabel) {
    EXPECT_TRUE(host_matches("*.contoso.com", "mail.contoso.com"));
    EXPECT_TRUE(host_matches("*.contoso.com", "MAIL.Contoso.COM"));
    EXPECT_FALSE(host_matches("*.contoso.com", "contoso.com"));
    EXPECT_FALSE(host_matches("*.contoso.com", "a.b.contoso.com"));
    EXPECT_FALSE(host_matches("*.contoso.com", "evilcontoso.com"));
    EXPECT_TRUE(host_matches("mail.contoso.com", "Mail.Contoso.Com"));
    EXPECT_FALSE(host_matches("mail.contoso.com", "mail.contoso.com.evil"));
}

TEST(Evaluate, UnknownFactsLeaveTheVerdictUndecided) {
    auto p = make_policy(std::string(R"(
[[rules]]
name = "Internal only"
action = "deny"
from = ["Internal"]

[[rules]]
name = "Published"
action = "allow"
public_names = ["mail.contoso.com"]
)") + upstream);
    // At the TLS stage: SNI known, Host and target not yet.
    facts f;
    f.listener = "web";
    f.client = ip("127.10.0.100");
    f.sni = "mail.contoso.com";
    auto d = p.evaluate(f);
    EXPECT_EQ(d.result, verdict::undecided) << trace_of(d);
    EXPECT_EQ(d.why, fault_class::none);
    EXPECT_EQ(d.rule_name, "Published");
    ASSERT_EQ(d.trace.size(), 2u);
    EXPECT_EQ(d.trace[0].result, outcome::failed);
    EXPECT_EQ(d.trace[0].condition, "from");
    EXPECT_EQ(d.trace[1].result, outcome::undecided);
    EXPECT_EQ(d.trace[1].condition, "public_names");
    EXPECT_EQ(d.to(), nullptr); // nothing to forward to while undecided

    // Once the Host is known the same rule decides, either way.
    f.host = "mail.contoso.com";
    f.target = "/owa/";
    f.method = "GET";
    EXPECT_EQ(p.evaluate(f).result, verdict::allow);
    f.host = "other.contoso.com";
    EXPECT_EQ(p.evaluate(f).result, verdict::deny);
    EXPECT_EQ(p.evaluate(f).why, fault_class::no_rule_matched);

    // An unknown client leaves a source condition undecided: it is not guessed either way.
    facts g;
    g.listener = "web";
    auto u = p.evaluate(g);
    EXPECT_EQ(u.result, verdict::undecided);
    EXPECT_EQ(u.rule_name, "Internal only");
    EXPECT_EQ(u.trace.back().condition, "from");
}

TEST(Evaluate, RulesWithoutPathsDecideBeforeTheTargetIsKnown) {
    // At connection time only the listener and client are known. A rule that has no path,
    // host or method condition must decide now, not wait for facts it does not look at.
    auto p = make_policy(std::string(R"(
[[rules]]
name = "Block the DMZ"
action = "deny"
from = ["Perimeter"]

[[rules]]
name = "OWA"
action = "allow"
paths = ["/owa"]
)") + upstream);
    facts f;
    f.listener = "web";
    f.client = ip("127.20.0.5");
    auto d = p.evaluate(f);
    EXPECT_EQ(d.result, verdict::deny) << trace_of(d);
    EXPECT_EQ(d.why, fault_class::rule_denied);
    EXPECT_EQ(d.rule_name, "Block the DMZ");

    // A client the first rule does not cover waits for the path the second rule needs.
    f.client = ip("127.10.0.100");
    auto u = p.evaluate(f);
    EXPECT_EQ(u.result, verdict::undecided) << trace_of(u);
    EXPECT_EQ(u.rule_name, "OWA");
    EXPECT_EQ(u.trace.back().condition, "paths");
}

TEST(Evaluate, AllowWithoutPathsWaitsForThePath) {
    // An allow without a path condition still depends on the path: an unsafe one (an
    // escape, double encoding) never matches a publishing rule. So it is undecided until
    // the target is known, then decided either way.
    auto p = make_policy(std::string(R"(
[[rules]]
name = "Everything from the DMZ"
action = "allow"
from = ["Perimeter"]
)") + upstream);
    facts f;
    f.listener = "web";
    f.client = ip("127.20.0.5");
    auto d = p.evaluate(f);
    EXPECT_EQ(d.result, verdict::undecided) << trace_of(d);
    EXPECT_EQ(d.trace.back().condition, "paths");
    f.target = "/owa/";
    EXPECT_EQ(p.evaluate(f).result, verdict::allow);
    f.target = "/owa/../ecp/";
    EXPECT_EQ(p.evaluate(f).result, verdict::deny);
}

TEST(Evaluate, Users) {
    auto p = make_policy(std::string(R"(
[[rules]]
name = "Admins"
action = "allow"
paths = ["/ecp"]
groups = ["admins"]
)") + upstream + R"(
[[rules]]
name = "Bob"
action = "allow"
paths = ["/bob"]
users = ["bob"]
)" + upstream + R"(
[[rules]]
name = "Anyone signed in"
action = "allow"
paths = ["/owa"]
users = ["*"]
)" + upstream + R"(
[[rules]]
name = "Public"
action = "allow"
paths = ["/public"]
)" + upstream);
    struct c {
        const char* target;
        identity who;
        const char* user;
        std::vector<std::string> groups;
        verdict want;
        fault_class why;
        const char* rule;
    };
    std::vector<c> cases = {
        {"/public/", identity::anonymous, "", {}, verdict::allow, fault_class::none, "Public"},
        {"/public/",
         identity::authenticated,
         "bob",
         {"staff"},
         verdict::allow,
         fault_class::none,
         "Public"},
        {"/owa/",
         identity::authenticated,
         "bob",
         {"staff"},
         verdict::allow,
         fault_class::none,
         "Anyone signed in"},
        {"/owa/",
         identity::authenticated,
         "carol",
         {},
         verdict::allow,
         fault_class::none,
         "Anyone signed in"},
        {"/owa/",
         identity::anonymous,
         "",
         {},
         verdict::deny,
         fault_class::auth_required,
         "Anyone signed in"},
        {"/owa/", identity::unknown, "", {}, verdict::undecided, fault_class::none, "Anyone signed in"},
        {"/ecp/",
         identity::authenticated,
         "alice",
         {"admins"},
         verdict::allow,
         fault_class::none,
         "Admins"},
        {"/ecp/",
         identity::authenticated,
         "bob",
         {"staff"},
         verdict::deny,
         fault_class::no_rule_matched,
         "default deny"},
        {"/ecp/", identity::anonymous, "", {}, verdict::deny, fault_class::auth_required, "Admins"},
        {"/bob/", identity::authenticated, "bob", {"staff"}, verdict::allow, fault_class::none, "Bob"},
        {"/bob/",
         identity::authenticated,
         "alice",
         {"admins"},
         verdict::deny,
         fault_class::no_rule_matched,
         "default deny"},
    };
    for (auto& x : cases) {
        auto f = web_request(x.target);
        f.who = x.who;
        f.user = x.user;
        f.groups = x.groups;
        auto d = p.evaluate(f);
        EXPECT_EQ(d.result, x.want) << x.target << " as '" << x.user << "'\n" << trace_of(d);
        EXPECT_EQ(d.why, x.why) << x.target << " as '" << x.user << "'";
        EXPECT_EQ(d.rule_name, x.rule) << x.target << " as '" << x.user << "'";
    }
}

TEST(Evaluate, AuthRequiredNamesTheRuleThatWouldAllow) {
    auto p = make_policy(std::string(R"(
[[rules]]
name = "OWA"
action = "allow"
paths = ["/owa"]
users = ["*"]
)") + upstream);
    auto d = p.evaluate(web_request("/owa/"));
    EXPECT_EQ(d.result, verdict::deny);
    EXPECT_EQ(d.why, fault_class::auth_required);
    EXPECT_STREQ(to_string(d.why), "auth-required");
    EXPECT_EQ(d.matched, nullptr);
    EXPECT_EQ(d.to(), nullptr);
    EXPECT_EQ(d.rule_name, "OWA");
    EXPECT_EQ(d.where.line, 31);
    ASSERT_EQ(d.trace.size(), 1u);
    EXPECT_EQ(d.trace[0].condition, "users");
    EXPECT_NE(d.trace[0].reason.find("anonymous"), std::string::npos);
    // A later rule that matches wins over asking for credentials.
    auto q = make_policy(std::string(R"(
[[rules]]
name = "OWA"
action = "allow"
paths = ["/owa"]
users = ["*"]
)") + upstream + R"(
[[rules]]
name = "Deny rest"
action = "deny"
)");
    EXPECT_EQ(q.evaluate(web_request("/owa/")).why, fault_class::rule_denied);
}

TEST(Evaluate, UnsafePathsNeverMatchAPublishingRule) {
    auto p = make_policy(std::string(R"(
[[rules]]
name = "Everything"
action = "allow"
)") + upstream);
    for (const char* t :
         {"/owa/../ecp/", "/owa/%2e%2e/ecp/", "/owa/%252e%252e/", "/owa\\..\\ecp"}) {
        auto d = p.evaluate(web_request(t));
        EXPECT_EQ(d.result, verdict::deny) << t;
        EXPECT_FALSE(d.path.safe()) << t;
        ASSERT_EQ(d.trace.size(), 1u);
        EXPECT_EQ(d.trace[0].condition, "paths");
        EXPECT_NE(d.trace[0].reason.find("unsafe path"), std::string::npos);
    }
    EXPECT_EQ(p.evaluate(web_request("/owa/")).result, verdict::allow);
}

const std::string exchange_rules = R"(
[[rules]]
name = "Exchange"
kind = "exchange"
listeners = ["web"]
domain = "contoso.com"
target = { address = "10.0.0.5", port = 443, tls = true, name = "mail.contoso.com" }
)";

TEST(Evaluate, ExchangeRefusesTheProxyShellShape) {
    auto p = make_policy(exchange_rules);
    for (const char* t : {"/autodiscover/autodiscover.json?@x.com/Powershell",
                          "/autodiscover/autodiscover.json?@x.com/powershell/?X-Rps-CAT=abc",
                          "/autodiscover/autodiscover.json?@x.com/%50ower%73hell",
                          "/AutoDiscover/autodiscover.json?@x.com/mapi/nspi/&Email=autodiscover/"
                          "autodiscover.json%3F@x.com/PowerShell"}) {
        auto d = p.evaluate(web_request(t, "POST"));
        EXPECT_EQ(d.result, verdict::deny) << t << "\n" << trace_of(d);
        EXPECT_EQ(d.why, fault_class::rule_denied) << t;
        EXPECT_EQ(d.rule_name, "Exchange/autodiscover") << t;
        EXPECT_NE(d.reason.find("ProxyShell"), std::string::npos) << d.reason;
        EXPECT_EQ(d.to(), nullptr) << t;
    }
    // Ordinary Autodiscover passes, on both names.
    auto ok = p.evaluate(web_request("/autodiscover/autodiscover.xml", "POST"));
    EXPECT_EQ(ok.result, verdict::allow) << trace_of(ok);
    auto f = web_request("/Autodiscover/Autodiscover.xml", "POST");
    f.host = "Autodiscover.Contoso.com";
    EXPECT_EQ(p.evaluate(f).result, verdict::allow);
    // ...and autodiscover.<domain> is for Autodiscover only.
    f.target = "/owa/";
    f.method = "GET";
    EXPECT_EQ(p.evaluate(f).result, verdict::deny);
}

TEST(Evaluate, ExchangeServicesByMethod) {
    auto p = make_policy(exchange_rules);
    struct c {
        const char* method;
        const char* target;
        verdict want;
        const char* rule;
    };
    for (auto [method, target, want, rule] : {
             c{"GET", "/owa/", verdict::allow, "Exchange/owa"},
             c{"OPTIONS", "/Microsoft-Server-ActiveSync?Cmd=Ping", verdict::allow,
               "Exchange/activesync"},
             c{"GET", "/Microsoft-Server-ActiveSync", verdict::deny, "default deny"},
             c{"RPC_IN_DATA", "/rpc/rpcproxy.dll?ex01:6001", verdict::allow,
               "Exchange/outlook_anywhere"},
             c{"RPC_OUT_DATA", "/rpc/rpcproxy.dll?ex01:6001", verdict::allow,
               "Exchange/outlook_anywhere"},
             c{"GET", "/rpc/rpcproxy.dll", verdict::deny, "default deny"},
             c{"POST", "/mapi/emsmdb", verdict::allow, "Exchange/mapi"},
             c{"POST", "/EWS/Exchange.asmx", verdict::allow, "Exchange/ews"},
             c{"GET", "/OAB/x/oab.xml", verdict::allow, "Exchange/oab"},
             c{"POST", "/OAB/x", verdict::deny, "default deny"},
             c{"GET", "/ecp/", verdict::deny, "default deny"},
         }) {
        auto d = p.evaluate(web_request(target, method));
        EXPECT_EQ(d.result, want) << method << " " << target << "\n" << trace_of(d);
        EXPECT_EQ(d.rule_name, rule) << method << " " << target;
    }
}

// ---- SMTP ----------------------------------------------------------------------------

const std::string smtp_rules = std::string(R"(
[[rules]]
name = "SMTP"
kind = "server"
action = "allow"
listeners = ["smtp"]
accepted_domains = ["contoso.com", "*.contoso.net"]
relay_from = ["relayhost"]
target = { address = "10.0.0.5", port = 25 }
)");

facts mail(const char* rcpt, const char* client = "127.10.0.100",
           identity who = identity::anonymous) {
    facts f;
    f.listener = "smtp";
    f.client = ip(client);
    f.who = who;
    if (who == identity::authenticated)
        f.user = "alice";
    f.mail_from = "sender@example.org";
    f.rcpt = rcpt;
    return f;
}

TEST(Evaluate, SmtpRelayPolicy) {
    auto p = make_policy(smtp_rules);
    struct c {
        const char* rcpt;
        const char* client;
        identity who;
        verdict want;
        const char* disposition;
        const char* reason_has;
    };
    std::vector<c> cases = {
        {"user@contoso.com", "127.10.0.100", identity::anonymous, verdict::allow, "submit",
         "accepted domain contoso.com"},
        {"<User@Contoso.COM>", "127.10.0.100", identity::anonymous, verdict::allow, "submit",
         "contoso.com"},
        {"user@mail.contoso.net", "127.10.0.100", identity::anonymous, verdict::allow, "submit",
         ""},
        {"user@fabrikam.com", "127.10.0.100", identity::anonymous, verdict::deny, "", " denied"},
        {"user@sub.contoso.com", "127.10.0.100", identity::anonymous, verdict::deny, "",
         " denied"},
        {"user@contoso.com.evil.org", "127.10.0.100", identity::anonymous, verdict::deny, "",
         " denied"},
        {"user@[10.0.0.5]", "127.10.0.100", identity::anonymous, verdict::deny, "", " denied"},
        {"user@fabrikam.com", "10.1.2.3", identity::anonymous, verdict::allow, "relay",
         "relay_from"},
        {"user@fabrikam.com", "10.1.2.4", identity::anonymous, verdict::deny, "", " denied"},
        {"user@fabrikam.com", "127.10.0.100", identity::authenticated, verdict::allow, "relay",
         "authenticated user 'alice'"},
        {"user@fabrikam.com", "127.10.0.100", identity::unknown, verdict::undecided, "",
         "authentication"},
    };
    for (auto& x : cases) {
        auto d = p.evaluate(mail(x.rcpt, x.client, x.who));
        EXPECT_EQ(d.result, x.want) << x.rcpt << " from " << x.client << ": " << d.reason;
        EXPECT_EQ(d.smtp_disposition, x.disposition) << x.rcpt << " from " << x.client;
        EXPECT_NE(d.reason.find(x.reason_has), std::string::npos) << x.rcpt << ": " << d.reason;
        EXPECT_EQ(d.rule_name, "SMTP");
        if (x.want == verdict::deny) {
            EXPECT_EQ(d.why, fault_class::rule_denied);
            EXPECT_EQ(d.because, basis::relay_not_permitted) << x.rcpt << ": " << to_string(d.because);
            EXPECT_EQ(d.to(), nullptr);
        }
        if (x.want == verdict::allow) {
            ASSERT_NE(d.to(), nullptr);
            EXPECT_EQ(d.to()->port, 25);
        }
    }
    // Before RCPT TO the transaction is allowed to proceed; relaying is judged per recipient.
    auto f = mail("x@y.z");
    f.rcpt.reset();
    auto d = p.evaluate(f);
    EXPECT_EQ(d.result, verdict::allow);
    EXPECT_EQ(d.smtp_disposition, "");
}

TEST(Evaluate, SmtpTricksNeverRelay) {
    auto p = make_policy(smtp_rules);
    struct c {
        const char* rcpt;
        const char* trick;
    };
    std::vector<c> tricks = {
        {"a%b.com@contoso.com", "percent hack"},
        {"b.com!a@contoso.com", "bang path"},
        {"@a.com:u@contoso.com", "source route"},
        {"<@a.com,@b.com:u@contoso.com>", "source route"},
        {"\"a@b\"@contoso.com", "quoted local part"},
        {"\"a\"@contoso.com", "quoted local part"},
        {"a@b@contoso.com", "more than one '@'"},
        {"a@fabrikam.com@contoso.com", "more than one '@'"},
        {"u:x@contoso.com", "source route"},
        {"@contoso.com", "source route"},
        {"contoso.com", "no domain"},
        {"<>", "empty recipient"},
    };
    for (auto& t : tricks) {
        EXPECT_NE(relay_trick(t.rcpt).find(t.trick), std::string::npos)
            << t.rcpt << ": " << relay_trick(t.rcpt);
        // Never relayed, whoever asks: anonymous, a relay host, an authenticated user.
        for (auto& f : {mail(t.rcpt), mail(t.rcpt, "10.1.2.3"),
                        mail(t.rcpt, "127.10.0.100", identity::authenticated)}) {
            auto d = p.evaluate(f);
            EXPECT_EQ(d.result, verdict::deny) << t.rcpt << ": " << d.reason;
            EXPECT_EQ(d.why, fault_class::rule_denied) << t.rcpt;
            EXPECT_EQ(d.smtp_disposition, "") << t.rcpt;
            EXPECT_EQ(d.because, basis::relay_trick) << d.reason;
            EXPECT_NE(d.reason.find("never relayed"), std::string::npos) << d.reason;
        }
    }
    EXPECT_EQ(relay_trick("user@contoso.com"), "");
    EXPECT_EQ(relay_trick("<user@contoso.com>"), "");
    EXPECT_EQ(relay_trick(std::string(65, 'a') + "@contoso.com"),
              "a local part longer than 64 octets");
    EXPECT_EQ(mailbox_domain("<User@Contoso.COM>"), "contoso.com");
    EXPECT_EQ(mailbox_domain("u@[10.0.0.5]"), "[10.0.0.5]");
    EXPECT_EQ(mailbox_domain("nodomain"), "");
}

TEST(Evaluate, SmtpWithoutAuthenticatedRelay) {
    auto p = make_policy(R"(
[[rules]]
name = "MX"
kind = "server"
action = "allow"
accepted_domains = ["contoso.com"]
relay_authenticated = false
target = { address = "10.0.0.5", port = 25 }
)");
    auto d = p.evaluate(mail("user@fabrikam.com", "127.10.0.100", identity::authenticated));
    EXPECT_EQ(d.result, verdict::deny);
    EXPECT_EQ(d.because, basis::relay_not_permitted);
    // Not knowing the identity does not matter when authentication cannot help.
    EXPECT_EQ(p.evaluate(mail("user@fabrikam.com", "127.10.0.100", identity::unknown)).result,
              verdict::deny);
    EXPECT_EQ(
        p.evaluate(mail("user@contoso.com", "127.10.0.100", identity::unknown)).smtp_disposition,
        "submit");
}

TEST(Evaluate, SourceContains) {
    auto p = make_policy("");
    EXPECT_TRUE(p.source_contains("Internal", ip("10.9.9.9")));
    EXPECT_FALSE(p.source_contains("Internal", ip("127.20.0.1")));
    EXPECT_TRUE(p.source_contains("External", ip("127.10.0.100")));
    EXPECT_FALSE(p.source_contains("External", ip("10.9.9.9")));
    EXPECT_TRUE(p.source_contains("relayhost", ip("10.1.2.3")));
    EXPECT_FALSE(p.source_contains("relayhost", ip("10.1.2.4")));
    EXPECT_FALSE(p.source_contains("nosuch", ip("10.1.2.3")));
    EXPECT_TRUE(p.source_contains("Internal", ip("::ffff:10.1.2.3")));
}

} // namespace
