// Static checks of one instance's policy: each finding has its code, its severity, and
// points at the line that causes it; a clean config has none.
#include <gtest/gtest.h>

#include <string>
#include <string_view>
#include <vector>

#include "dmz/rules/config.hpp"
#include "support/test_text.hpp"
#include "dmz/rules/lint.hpp"

namespace {

using namespace dmz::rules;
using namespace dmz::test;



const std::string networks = R"([networks.Internal]
ranges = ["10.0.0.0/8"]

[networks.Perimeter]
ranges = ["127.20.0.0/16"]

[address_sets.relayhost]
ranges = ["10.1.2.3/32"]

[address_sets.scanner]
ranges = ["192.0.2.25/32"]

[address_sets.partners]
ranges = ["192.0.2.0/24"]

[address_sets.appservers]
ranges = ["10.5.0.0/28"]
)";

/// Loads `text` (which must load without errors) and lints it.
diagnostics lint_text(const std::string& text) {
    auto r = load_instance_config_text(text, "/tmp/x/lint.toml");
    EXPECT_FALSE(has_errors(r.diags)) << dump(r.diags);
    EXPECT_TRUE(r.config);
    diagnostics out;
    if (r.config)
        lint(*r.config, out);
    return out;
}


void expect_at(const diagnostic& d, text_pos p) {
    EXPECT_EQ(d.where.file, "/tmp/x/lint.toml");
    EXPECT_EQ(d.where.line, p.line) << d.code << " " << d.message;
    EXPECT_EQ(d.where.column, p.column) << d.code << " " << d.message;
}

const std::string clean = networks + R"(
[instance]
name = "edge"

[listeners.web]
protocol = "http"
bind = ["127.10.0.10:80"]

[listeners.smtp]
protocol = "smtp"
bind = ["127.10.0.10:25"]

[[rules]]
name = "Block ECP"
action = "deny"
paths = ["/ecp"]

[[rules]]
name = "OWA"
action = "allow"
listeners = ["web"]
from = ["External"]
paths = ["/owa"]
target = { address = "10.0.0.5", port = 80 }

[[rules]]
name = "Mail"
kind = "server"
action = "allow"
listeners = ["smtp"]
accepted_domains = ["contoso.com"]
relay_from = ["relayhost", "scanner"]
target = { address = "10.0.0.5", port = 25 }
)";

TEST(Lint, CleanConfigHasNoFindings) {
    auto d = lint_text(clean);
    EXPECT_TRUE(d.empty()) << dump(d);
}

TEST(Lint, ListenersOnOneAddressAndPortAreLst001) {
    struct c {
        const char* first;
        const char* second;
        bool conflict;
    };
    for (auto [first, second, conflict] : {
             c{"127.0.0.1:25", "127.0.0.1:25", true},
             c{"0.0.0.0:25", "127.0.0.1:25", true},
             c{"127.0.0.1:25", "0.0.0.0:25", true},
             c{"[::]:25", "127.0.0.1:25", true}, // a v6 wildcard takes v4 too
             c{"[::1]:25", "[::1]:25", true},
             c{"127.0.0.1:25", "127.0.0.2:25", false},
             c{"127.0.0.1:25", "127.0.0.1:2525", false},
             c{"0.0.0.0:25", "[::1]:25", false},
             c{"0.0.0.0:25", "0.0.0.0:587", false},
         }) {
        std::string text = std::string("[listeners.smtp]\nprotocol = \"smtp\"\nbind = [\"") +
                           first + "\"]\n\n[listeners.smtp-all]\nprotocol = \"smtp\"\nbind = [\"" +
                           second + "\"]\n";
        auto d = lint_text(text);
        auto found = with_code(d, "LST001");
        if (!conflict) {
            EXPECT_TRUE(found.empty()) << first << " / " << second << "\n" << dump(d);
            continue;
        }
        ASSERT_EQ(found.size(), 1u) << first << " / " << second << "\n" << dump(d);
        EXPECT_EQ(found[0]->level, severity::error);
        expect_at(*found[0], pos_of(text, "\"", 7)); // the second listener's bind element
        EXPECT_EQ(found[0]->key, "listeners.smtp-all.bind");
        EXPECT_NE(found[0]->message.find("'smtp-all'"), std::string::npos) << found[0]->message;
        EXPECT_NE(found[0]->message.find("'smtp'"), std::string::npos) << found[0]->message;
        EXPECT_NE(found[0]->message.find("/tmp/x/lint.toml:3:9"), std::string::npos)
            << found[0]->message;
    }
}

std::string smtp_rule(const std::string& relay_from) {
    return networks + R"(
[listeners.smtp]
protocol = "smtp"
bind = ["127.10.0.10:25"]

[[rules]]
name = "Mail"
kind = "server"
action = "allow"
accepted_domains = ["contoso.com"]
relay_from = )" +
           relay_from + R"(
target = { address = "10.0.0.5", port = 25 }
)";
}

TEST(Lint, RelayFromExternalIsAnOpenRelay) {
    auto text = smtp_rule(R"(["relayhost", "External"])");
    auto d = lint_text(text);
    auto found = with_code(d, "SMTP001");
    ASSERT_EQ(found.size(), 1u) << dump(d);
    EXPECT_EQ(found[0]->level, severity::error);
    expect_at(*found[0], pos_of(text, "relay_from"));
    EXPECT_EQ(found[0]->key, "rules.Mail.relay_from");
    EXPECT_NE(found[0]->message.find("open relay"), std::string::npos);
    EXPECT_NE(found[0]->message.find("External"), std::string::npos);
    EXPECT_TRUE(with_code(d, "SMTP002").empty()) << dump(d);

    // A wide range on External is "anyone" too.
    auto d2 = lint_text(smtp_rule(R"(["partners"])"));
    ASSERT_EQ(with_code(d2, "SMTP001").size(), 1u) << dump(d2);
}

TEST(Lint, SingleRelayHostIsFine) {
    for (const char* from : {R"(["scanner"])", R"(["relayhost"])", R"(["relayhost", "scanner"])"}) {
        auto d = lint_text(smtp_rule(from));
        EXPECT_TRUE(d.empty()) << from << "\n" << dump(d);
    }
}

TEST(Lint, RelayFromAWholeNetworkIsSmtp002) {
    auto text = smtp_rule(R"(["Perimeter"])");
    auto d = lint_text(text);
    EXPECT_TRUE(with_code(d, "SMTP001").empty()) << dump(d);
    auto found = with_code(d, "SMTP002");
    ASSERT_EQ(found.size(), 1u) << dump(d);
    EXPECT_EQ(found[0]->level, severity::warning);
    expect_at(*found[0], pos_of(text, "relay_from"));
    EXPECT_NE(found[0]->message.find("2^16"), std::string::npos) << found[0]->message;

    // More than a handful of hosts in an address set, too.
    auto d2 = lint_text(smtp_rule(R"(["appservers"])"));
    ASSERT_EQ(with_code(d2, "SMTP002").size(), 1u) << dump(d2);
    EXPECT_TRUE(with_code(d2, "SMTP001").empty());
}

TEST(Lint, NoAcceptedDomainsIsSmtp006) {
    auto d = lint_text(networks + R"(
[[rules]]
name = "Mail"
kind = "server"
action = "allow"
target = { address = "10.0.0.5", port = 25 }
)");
    ASSERT_EQ(with_code(d, "SMTP006").size(), 1u) << dump(d);
}

const std::string web_listener = networks + R"(
[listeners.web]
protocol = "http"
bind = ["127.10.0.10:80"]
)";

TEST(Lint, ShadowedRuleIsRule001) {
    struct c {
        const char* name;
        const char* rules;
        bool shadowed;
        severity level;
    };
    const char* up = "target = { address = \"10.0.0.5\", port = 80 }\n";
    std::vector<c> cases = {
        {"deny below a wider allow",
         "[[rules]]\nname = \"A\"\naction = \"allow\"\nfrom = [\"External\"]\npaths = "
         "[\"/owa\"]\n%\n"
         "[[rules]]\nname = \"B\"\naction = \"deny\"\nfrom = [\"External\"]\npaths = "
         "[\"/owa/private\"]\n",
         true, severity::error},
        {"allow below a wider allow",
         "[[rules]]\nname = \"A\"\naction = \"allow\"\npaths = [\"/owa\"]\n%\n"
         "[[rules]]\nname = \"B\"\naction = \"allow\"\npaths = [\"/OWA/x\"]\nmethods = "
         "[\"GET\"]\n%\n",
         true, severity::warning},
        {"wildcard name covers the name",
         "[[rules]]\nname = \"A\"\naction = \"allow\"\npublic_names = [\"*.contoso.com\"]\n%\n"
         "[[rules]]\nname = \"B\"\naction = \"deny\"\npublic_names = [\"mail.contoso.com\"]\n",
         true, severity::error},
        {"network covers an address set inside it",
         "[[rules]]\nname = \"A\"\naction = \"deny\"\nfrom = [\"Internal\"]\n\n"
         "[[rules]]\nname = \"B\"\naction = \"allow\"\nfrom = [\"relayhost\"]\n%\n",
         true, severity::error},
        {"any user covers named users",
         "[[rules]]\nname = \"A\"\naction = \"deny\"\n\n"
         "[[rules]]\nname = \"B\"\naction = \"allow\"\nusers = [\"*\"]\n%\n",
         true, severity::error},
        {"narrower rule first",
         "[[rules]]\nname = \"A\"\naction = \"deny\"\npaths = [\"/owa/private\"]\n\n"
         "[[rules]]\nname = \"B\"\naction = \"allow\"\npaths = [\"/owa\"]\n%\n",
         false, severity::error},
        {"other source",
         "[[rules]]\nname = \"A\"\naction = \"allow\"\nfrom = [\"Internal\"]\npaths = "
         "[\"/owa\"]\n%\n"
         "[[rules]]\nname = \"B\"\naction = \"deny\"\nfrom = [\"External\"]\npaths = [\"/owa\"]\n",
         false, severity::error},
        {"segment boundary",
         "[[rules]]\nname = \"A\"\naction = \"allow\"\npaths = [\"/owa\"]\n%\n"
         "[[rules]]\nname = \"B\"\naction = \"deny\"\npaths = [\"/owanage\"]\n",
         false, severity::error},
        {"other method",
         "[[rules]]\nname = \"A\"\naction = \"allow\"\npaths = [\"/owa\"]\nmethods = [\"GET\"]\n%\n"
         "[[rules]]\nname = \"B\"\naction = \"deny\"\npaths = [\"/owa\"]\nmethods = [\"POST\"]\n",
         false, severity::error},
        {"named user does not cover anyone",
         "[[rules]]\nname = \"A\"\naction = \"allow\"\nusers = [\"*\"]\n%\n"
         "[[rules]]\nname = \"B\"\naction = \"deny\"\n",
         false, severity::error},
        {"disabled rule shadows nothing",
         "[[rules]]\nname = \"A\"\nenabled = false\naction = \"allow\"\npaths = [\"/owa\"]\n%\n"
         "[[rules]]\nname = \"B\"\naction = \"deny\"\npaths = [\"/owa/x\"]\n",
         false, severity::error},
    };
    for (auto& x : cases) {
        std::string rules = x.rules;
        for (auto p = rules.find('%'); p != std::string::npos; p = rules.find('%'))
            rules.replace(p, 2, up);
        auto text = web_listener + "\n" + rules;
        auto d = lint_text(text);
        auto found = with_code(d, "RULE001");
        if (!x.shadowed) {
            EXPECT_TRUE(found.empty()) << x.name << "\n" << dump(d);
            continue;
        }
        ASSERT_EQ(found.size(), 1u) << x.name << "\n" << dump(d);
        EXPECT_EQ(found[0]->level, x.level) << x.name;
        expect_at(*found[0], pos_of(text, "[[rules]]", 2)); // the later rule
        EXPECT_EQ(found[0]->key, "rules.B");
        // Names the earlier rule and where it is.
        auto a = pos_of(text, "[[rules]]", 1);
        EXPECT_NE(found[0]->message.find("'A' (/tmp/x/lint.toml:" + std::to_string(a.line) + ":1)"),
                  std::string::npos)
            << found[0]->message;
    }
}

TEST(Lint, EnabledTestRuleIsRule003) {
    auto text = web_listener + R"(
[[rules]]
name = "Test rule"
test = true
action = "allow"
target = { address = "10.0.0.5", port = 80 }
)";
    auto d = lint_text(text);
    auto found = with_code(d, "RULE003");
    ASSERT_EQ(found.size(), 1u) << dump(d);
    EXPECT_EQ(found[0]->level, severity::error);
    expect_at(*found[0], pos_of(text, "[[rules]]"));
    EXPECT_NE(found[0]->message.find("test rule 'Test rule' is enabled"), std::string::npos);
    EXPECT_NE(found[0]->hint.find("--with-test-rule"), std::string::npos);

    // Left disabled, as it should be: nothing.
    auto off = text;
    off.replace(off.find("test = true"), 11, "test = true\nenabled = false");
    EXPECT_TRUE(lint_text(off).empty()) << dump(lint_text(off));

    // An allow rule without any condition opens everything, test rule or not.
    auto d2 = lint_text(web_listener + R"(
[[rules]]
name = "Everything"
action = "allow"
target = { address = "10.0.0.5", port = 80 }
)");
    auto f2 = with_code(d2, "RULE003");
    ASSERT_EQ(f2.size(), 1u) << dump(d2);
    EXPECT_NE(f2[0]->message.find("allows everything"), std::string::npos);
}

TEST(Lint, PublishingToOwnListenerIsRule004) {
    auto text = web_listener + R"(
[[rules]]
name = "Loop"
action = "allow"
paths = ["/owa"]
target = { address = "127.10.0.10", port = 80 }
)";
    auto d = lint_text(text);
    auto found = with_code(d, "RULE004");
    ASSERT_EQ(found.size(), 1u) << dump(d);
    EXPECT_EQ(found[0]->level, severity::error);
    expect_at(*found[0], pos_of(text, "{ address"));
    EXPECT_EQ(found[0]->key, "rules.Loop.target");
    // Another port of the same address is not a loop.
    auto other = text;
    other.replace(other.find("port = 80 }"), 9, "port = 81");
    EXPECT_TRUE(with_code(lint_text(other), "RULE004").empty());
}

TEST(Lint, TrustingForwardedAddressesFromExternalIsTrust001) {
    struct c {
        const char* trust;
        bool finding;
    };
    for (auto [trust, finding] : {c{R"(["External"])", true}, c{R"(["partners"])", true},
                                  c{R"(["Perimeter"])", false}, c{R"(["scanner"])", false}}) {
        auto text = std::string("[instance]\ntrust_forwarded_from = ") + trust + "\n\n" + networks;
        auto d = lint_text(text);
        auto found = with_code(d, "TRUST001");
        EXPECT_EQ(found.size(), finding ? 1u : 0u) << trust << "\n" << dump(d);
        if (!found.empty()) {
            EXPECT_EQ(found[0]->level, severity::error);
            EXPECT_EQ(found[0]->key, "instance.trust_forwarded_from");
            expect_at(*found[0], {2, 1}); // the trust_forwarded_from line, not the top of the file
        }
    }
}

TEST(Lint, SourceThatCannotReachTheListenerIsRule002) {
    auto text = networks + R"(
[listeners.dmz]
protocol = "http"
bind = ["127.20.0.10:80"]

[[rules]]
name = "From the LAN"
action = "allow"
from = ["Internal"]
paths = ["/owa"]
target = { address = "10.0.0.5", port = 80 }
)";
    auto d = lint_text(text);
    auto found = with_code(d, "RULE002");
    ASSERT_EQ(found.size(), 1u) << dump(d);
    EXPECT_EQ(found[0]->level, severity::error);
    expect_at(*found[0], pos_of(text, "from = "));
    EXPECT_EQ(found[0]->key, "rules.From the LAN.from");
    EXPECT_NE(found[0]->message.find("dmz on Perimeter"), std::string::npos) << found[0]->message;

    // Sources on the listener's network reach it.
    auto perim = text;
    perim.replace(perim.find("from = [\"Internal\"]"), 19, "from = [\"Internal\", \"Perimeter\"]");
    EXPECT_TRUE(with_code(lint_text(perim), "RULE002").empty());
    // So does anything, once the previous tier on that network forwards the client address.
    auto trusted = "[instance]\ntrust_forwarded_from = [\"Perimeter\"]\n\n" + text;
    EXPECT_TRUE(with_code(lint_text(trusted), "RULE002").empty()) << dump(lint_text(trusted));
    // A wildcard listener is on every network.
    auto wild = text;
    wild.replace(wild.find("127.20.0.10:80"), 14, "0.0.0.0:80");
    EXPECT_TRUE(with_code(lint_text(wild), "RULE002").empty());
}

TEST(Lint, ExchangeFindings) {
    auto text = web_listener + R"(
[[rules]]
name = "Exchange"
kind = "exchange"
listeners = ["web"]
from = ["External"]
domain = "contoso.com"
target = { address = "10.0.0.5", port = 443, tls = true, name = "mail.contoso.com" }
[rules.services]
ecp = true
activesync = { timeouts = { read = "10m" } }
)";
    auto d = lint_text(text);
    auto ecp = with_code(d, "EXCH001");
    ASSERT_EQ(ecp.size(), 1u) << dump(d);
    EXPECT_EQ(ecp[0]->key, "rules.Exchange/ecp");
    EXPECT_EQ(ecp[0]->level, severity::warning);
    auto eas = with_code(d, "EXCH003");
    ASSERT_EQ(eas.size(), 1u) << dump(d);
    EXPECT_NE(eas[0]->message.find("600 s"), std::string::npos) << eas[0]->message;
    EXPECT_EQ(d.size(), 2u) << dump(d);
}

TEST(Lint, NetworksOfSource) {
    auto r = load_instance_config_text(
        networks + "\n[address_sets.mixed]\nranges = [\"10.0.0.0/8\", \"8.8.8.8/32\"]\n",
        "/tmp/x/lint.toml");
    ASSERT_TRUE(r.config);
    auto& c = *r.config;
    EXPECT_EQ(networks_of_source(c, "External"), std::vector<std::string>{"External"});
    EXPECT_EQ(networks_of_source(c, "Internal"), std::vector<std::string>{"Internal"});
    EXPECT_EQ(networks_of_source(c, "relayhost"), std::vector<std::string>{"Internal"});
    EXPECT_EQ(networks_of_source(c, "scanner"), std::vector<std::string>{"External"});
    EXPECT_EQ(networks_of_source(c, "mixed"), (std::vector<std::string>{"External", "Internal"}));
    EXPECT_TRUE(networks_of_source(c, "nosuch").empty());
}

} // namespace
