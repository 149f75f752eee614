// The compiled policy: a listener resolved once to a listener_id decides exactly as the
// listener named in the facts does, an unknown listener is refused as before, and the
// compiled form is immutable, a reload building a new one.
#include <gtest/gtest.h>

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "dmz/rules/config.hpp"
#include "dmz/rules/evaluate.hpp"
#include "support/test_text.hpp"
#include "rules/policy_preamble.hpp"

namespace {

using namespace dmz::rules;
using namespace dmz::test;

const std::string listeners_text = "[instance]\ntrust_forwarded_from = [\"Perimeter\"]\n\n" + policy_preamble;

const std::string rules_text = R"(
[[rules]]
name = "Block private"
action = "deny"
paths = ["/owa/private/"]

[[rules]]
name = "Test rule"
test = true
enabled = false
action = "allow"
listeners = ["admin"]
target = { address = "10.0.0.5", port = 80 }

[[rules]]
name = "Admins"
action = "allow"
listeners = ["admin"]
from = ["Internal"]
paths = ["/ECP/"]
groups = ["admins"]
target = { address = "10.0.0.5", port = 80 }

[[rules]]
name = "OWA"
action = "allow"
listeners = ["web"]
from = ["External", "relayhost"]
public_names = ["*.contoso.com"]
paths = ["/owa"]
methods = ["GET", "POST"]
target = { address = "10.0.0.5", port = 80 }

[[rules]]
name = "SMTP"
kind = "server"
action = "allow"
listeners = ["smtp"]
accepted_domains = ["contoso.com"]
relay_from = ["relayhost"]
target = { address = "10.0.0.5", port = 25 }
)";

instance_config load(const std::string& text) {
    auto r = load_instance_config_text(text, "/tmp/x/compiled.toml");
    EXPECT_TRUE(r.diags.empty()) << dump(r.diags);
    EXPECT_TRUE(r.config);
    return r.config.value_or(instance_config{});
}

ip_address ip(const char* s) { return ip_address::parse(s).value(); }

/// Every field of two decisions, the trace entry by entry.
void expect_same(const decision& a, const decision& b, const std::string& what) {
    EXPECT_EQ(a.result, b.result) << what;
    EXPECT_EQ(a.why, b.why) << what;
    EXPECT_EQ(a.because, b.because) << what;
    EXPECT_EQ(a.matched, b.matched) << what;
    EXPECT_EQ(a.rule_name, b.rule_name) << what;
    EXPECT_EQ(a.where.file, b.where.file) << what;
    EXPECT_EQ(a.where.line, b.where.line) << what;
    EXPECT_EQ(a.reason, b.reason) << what;
    EXPECT_EQ(a.path.path, b.path.path) << what;
    EXPECT_EQ(a.path.unsafe, b.path.unsafe) << what;
    EXPECT_EQ(a.smtp_disposition, b.smtp_disposition) << what;
    ASSERT_EQ(a.trace.size(), b.trace.size()) << what;
    for (std::size_t i = 0; i < a.trace.size(); ++i) {
        EXPECT_EQ(a.trace[i].rule, b.trace[i].rule) << what << " #" << i;
        EXPECT_EQ(a.trace[i].where.line, b.trace[i].where.line) << what << " #" << i;
        EXPECT_EQ(a.trace[i].result, b.trace[i].result) << what << " #" << i;
        EXPECT_EQ(a.trace[i].condition, b.trace[i].condition) << what << " #" << i;
        EXPECT_EQ(a.trace[i].reason, b.trace[i].reason) << what << " #" << i;
    }
}

struct request_case {
    const char* listener;
    const char* client;  ///< nullptr: unknown
    const char* host;    ///< nullptr: unknown
    const char* target;  ///< nullptr: unknown (or SMTP)
    identity who;
    const char* user;
    std::vector<std::string> groups;
    const char* rcpt;  ///< SMTP
    bool test_rules;
    // what evaluate(facts) has always answered
    verdict want;
    basis because;
    const char* rule;
};

facts facts_of(const request_case& c) {
    facts f;
    f.listener = c.listener;
    if (c.client) f.client = ip(c.client);
    if (c.host) f.host = c.host;
    if (c.target) {
        f.target = c.target;
        f.method = "GET";
    }
    f.who = c.who;
    f.user = c.user;
    f.groups = c.groups;
    if (c.rcpt) {
        f.mail_from = "sender@example.org";
        f.rcpt = c.rcpt;
    }
    return f;
}

const identity anon = identity::anonymous;
const identity authd = identity::authenticated;
const char* ext = "127.10.0.100";

const std::vector<request_case> cases = {
    {"web", ext, "mail.contoso.com", "/owa/", anon, "", {}, nullptr, false, verdict::allow, basis::allowed, "OWA"},
    {"web", ext, "MAIL.Contoso.COM", "/OWA/inbox", anon, "", {}, nullptr, false, verdict::allow, basis::allowed, "OWA"},
    {"web", ext, "mail.contoso.com", "/owa/private/x", anon, "", {}, nullptr, false, verdict::deny, basis::denied_by_rule,
     "Block private"},
    {"web", ext, "contoso.com", "/owa/", anon, "", {}, nullptr, false, verdict::deny, basis::no_rule_matched, "default deny"},
    {"web", ext, nullptr, "/owa/", anon, "", {}, nullptr, false, verdict::undecided, basis::not_known_yet, "OWA"},
    {"web", nullptr, "mail.contoso.com", "/owa/", anon, "", {}, nullptr, false, verdict::undecided, basis::not_known_yet,
     "OWA"},
    {"web", "10.1.2.3", "mail.contoso.com", "/owa/", anon, "", {}, nullptr, false, verdict::allow, basis::allowed, "OWA"},
    {"web", "10.9.9.9", "mail.contoso.com", "/owa/", anon, "", {}, nullptr, false, verdict::deny, basis::no_rule_matched,
     "default deny"},
    {"web", ext, "mail.contoso.com", "/owanage", anon, "", {}, nullptr, false, verdict::deny, basis::no_rule_matched,
     "default deny"},
    {"admin", "10.9.9.9", nullptr, "/ecp/", authd, "alice", {"admins"}, nullptr, false, verdict::allow, basis::allowed,
     "Admins"},
    {"admin", "10.9.9.9", nullptr, "/ecp/", anon, "", {}, nullptr, false, verdict::deny, basis::needs_authentication,
     "Admins"},
    {"admin", "10.9.9.9", nullptr, "/ecp/", authd, "bob", {"staff"}, nullptr, false, verdict::deny,
     basis::no_rule_matched, "default deny"},
    {"admin", ext, nullptr, "/ecp/", authd, "alice", {"admins"}, nullptr, false, verdict::deny, basis::no_rule_matched,
     "default deny"},
    {"admin", ext, nullptr, "/ecp/", anon, "", {}, nullptr, true, verdict::allow, basis::allowed, "Test rule"},
    {"web", ext, "mail.contoso.com", "/ecp/", anon, "", {}, nullptr, true, verdict::deny, basis::no_rule_matched,
     "default deny"},
    {"smtp", ext, nullptr, nullptr, anon, "", {}, "user@Contoso.com", false, verdict::allow, basis::allowed, "SMTP"},
    {"smtp", ext, nullptr, nullptr, anon, "", {}, "user@fabrikam.com", false, verdict::deny, basis::relay_not_permitted,
     "SMTP"},
    {"smtp", "10.1.2.3", nullptr, nullptr, anon, "", {}, "user@fabrikam.com", false, verdict::allow, basis::allowed,
     "SMTP"},
    {"smtp", ext, nullptr, nullptr, anon, "", {}, "a%b@contoso.com", false, verdict::deny, basis::relay_trick, "SMTP"},
    {"smtp", ext, nullptr, nullptr, identity::unknown, "", {}, "user@fabrikam.com", false, verdict::undecided,
     basis::not_known_yet, "SMTP"},
};

TEST(Compiled, AListenerIdDecidesAsTheListenerName) {
    auto p = compile(load(listeners_text + rules_text));
    for (auto& c : cases) {
        std::string what = std::string(c.listener) + " " + (c.target ? c.target : "") + (c.rcpt ? c.rcpt : "") + " as '" +
                           c.user + "'" + (c.test_rules ? " with test rules" : "");
        auto f = facts_of(c);
        auto id = p->resolve_listener(c.listener);
        ASSERT_TRUE(id) << what;
        facts unnamed = f;
        unnamed.listener.clear();  // the id alone says which listener
        for (bool trace : {true, false}) {
            evaluate_options opts{.enable_test_rules = c.test_rules, .trace = trace};
            auto by_name = p->evaluate(f, opts);
            EXPECT_EQ(by_name.result, c.want) << what << ": " << by_name.reason;
            EXPECT_EQ(by_name.because, c.because) << what << ": " << by_name.reason;
            EXPECT_EQ(by_name.rule_name, c.rule) << what << ": " << by_name.reason;
            expect_same(by_name, p->evaluate(id, unnamed, opts), what + (trace ? " (trace)" : ""));
        }
        // The per-request path (no trace) visits only the listener's own rules; it decides
        // as the traced walk over every rule does.
        auto traced = p->evaluate(id, f, {.enable_test_rules = c.test_rules, .trace = true});
        auto quick = p->evaluate(id, f, {.enable_test_rules = c.test_rules, .trace = false});
        EXPECT_TRUE(quick.trace.empty()) << what;
        quick.trace = traced.trace;
        expect_same(traced, quick, what + " (trace or not)");
    }
}

TEST(Compiled, TheTraceNamesTheListenerOfTheId) {
    auto p = compile(load(listeners_text + rules_text));
    facts f;
    f.client = ip(ext);
    f.host = "mail.contoso.com";
    f.target = "/owa/";
    f.method = "GET";
    f.who = identity::anonymous;
    auto d = p->evaluate(p->resolve_listener("admin"), f);
    ASSERT_EQ(d.trace.size(), 5u);
    EXPECT_EQ(d.trace[3].rule, "OWA");
    EXPECT_EQ(d.trace[3].condition, "listener");
    EXPECT_EQ(d.trace[3].reason, "listener 'admin' is not one of: web");
}

TEST(Compiled, AnUnknownListenerIsRefusedAsBefore) {
    auto p = compile(load(listeners_text + rules_text));
    facts f;
    f.listener = "nosuch";
    f.client = ip(ext);
    f.target = "/owa/";
    auto by_name = p->evaluate(f);
    EXPECT_EQ(by_name.result, verdict::deny);
    EXPECT_EQ(by_name.why, fault_class::no_rule_matched);
    EXPECT_EQ(by_name.because, basis::no_rule_matched);
    EXPECT_EQ(by_name.matched, nullptr);
    EXPECT_EQ(by_name.rule_name, "default deny");
    EXPECT_EQ(by_name.reason, "no listener named 'nosuch'");
    EXPECT_TRUE(by_name.trace.empty());
    EXPECT_EQ(by_name.refusal().status, 403);

    auto id = p->resolve_listener("nosuch");
    EXPECT_FALSE(id);
    EXPECT_EQ(id, listener_id{});
    expect_same(by_name, p->evaluate(id, f), "unresolved id");
    expect_same(by_name, p->evaluate(listener_id{}, f, {.trace = false}), "empty id");
    // Names are matched exactly, as the config's own lookup does.
    EXPECT_FALSE(p->resolve_listener("WEB"));
    EXPECT_FALSE(p->resolve_listener(""));
}

// What a reload does: compile the new config while the old policy stays in use.
TEST(Compiled, ImmutableAndAReloadBuildsANewOne) {
    static_assert(!std::is_copy_assignable_v<policy>);
    static_assert(!std::is_move_assignable_v<policy>);
    static_assert(std::is_same_v<decltype(compile(std::declval<instance_config>())), std::shared_ptr<const policy>>);
    static_assert(std::is_same_v<decltype(std::declval<const policy&>().evaluate(std::declval<listener_id>(),
                                                                                 std::declval<const facts&>())),
                                 decision>);
    static_assert(std::is_same_v<decltype(std::declval<const policy&>().resolve_listener("web")), listener_id>);

    auto old_policy = compile(load(listeners_text + rules_text));
    auto old_web = old_policy->resolve_listener("web");
    facts f;
    f.client = ip(ext);
    f.host = "mail.contoso.com";
    f.target = "/owa/";
    f.method = "GET";
    f.who = identity::anonymous;
    auto before = old_policy->evaluate(old_web, f);
    ASSERT_EQ(before.result, verdict::allow);

    // The reloaded config adds a listener ahead of "web" and denies OWA.
    auto next_text = listeners_text + R"(
[listeners.extra]
protocol = "http"
bind = ["127.0.0.1:8082"]
)" + R"(
[[rules]]
name = "No OWA"
action = "deny"
paths = ["/owa"]
)" + rules_text;
    auto next_cfg = load(next_text);
    std::swap(next_cfg.listeners[0], next_cfg.listeners[3]);  // "web" moves to another place
    auto next = compile(std::move(next_cfg));
    ASSERT_NE(next.get(), old_policy.get());
    auto next_web = next->resolve_listener("web");
    ASSERT_TRUE(next_web);
    EXPECT_NE(next_web, old_web);
    auto after = next->evaluate(next_web, f);
    EXPECT_EQ(after.result, verdict::deny);
    EXPECT_EQ(after.rule_name, "No OWA");

    // The old policy, still held by the sessions that started with it, decides as before.
    expect_same(before, old_policy->evaluate(old_web, f), "old policy after the reload");
    EXPECT_EQ(old_policy->config().listeners.size(), 3u);
    // A stale id is never read as some listener of the new policy: refused as unknown.
    f.listener = "web";
    auto stale = next->evaluate(old_web, f);
    EXPECT_EQ(stale.result, verdict::deny);
    EXPECT_EQ(stale.reason, "no listener named 'web'");
    EXPECT_EQ(stale.matched, nullptr);
    // Compiling the same config again is a new policy too.
    auto again = compile(load(listeners_text + rules_text));
    EXPECT_NE(again->resolve_listener("web"), old_web);
    // Copies share the compiled form, so its ids hold for them.
    policy copy = *old_policy;
    EXPECT_EQ(copy.resolve_listener("web"), old_web);
    expect_same(before, copy.evaluate(old_web, f), "a copy");
    EXPECT_EQ(&copy.config(), &old_policy->config());
}

TEST(Compiled, SourcesAndTrustAsTheConfigNamesThem) {
    auto p = compile(load(listeners_text + rules_text));
    EXPECT_TRUE(p->trusts_forwarding_from(ip("127.20.0.10")));
    EXPECT_TRUE(p->trusts_forwarding_from(ip("::ffff:127.20.0.10")));
    EXPECT_FALSE(p->trusts_forwarding_from(ip("127.10.0.100")));
    EXPECT_FALSE(p->trusts_forwarding_from(ip("10.1.2.3")));
    EXPECT_TRUE(p->source_contains("External", ip("192.0.2.1")));
    EXPECT_FALSE(p->source_contains("External", ip("10.1.2.3")));
    EXPECT_TRUE(p->source_contains("relayhost", ip("10.1.2.3")));
    EXPECT_FALSE(p->source_contains("relayhost", ip("10.1.2.4")));
    EXPECT_FALSE(p->source_contains("nosuch", ip("10.1.2.3")));
    auto none = compile(load(R"([listeners.web]
protocol = "http"
bind = ["127.0.0.1:8080"]
)"));
    EXPECT_FALSE(none->trusts_forwarding_from(ip("127.20.0.10")));
}

TEST(Compiled, HostNamesFoldCaseWithoutCopies) {
    EXPECT_TRUE(host_matches("*.contoso.com", "A.CONTOSO.COM"));
    EXPECT_FALSE(host_matches("*.contoso.com", ".contoso.com"));
    EXPECT_FALSE(host_matches("*.contoso.com", "CONTOSO.COM"));
    EXPECT_TRUE(host_matches("[10.0.0.5]", "[10.0.0.5]"));
    EXPECT_FALSE(host_matches("mail.contoso.com", ""));
    EXPECT_FALSE(host_matches("", "x"));
    EXPECT_TRUE(host_matches("", ""));
}

}  // namespace
