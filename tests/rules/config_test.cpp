// Loading one instance's config: every problem is one diagnostic with a stable code, the
// file:line:column where it is written, and the dotted key; the Exchange stanza's expansion.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "dmz/rules/config.hpp"
#include "support/test_text.hpp"

namespace {

namespace fs = std::filesystem;
using namespace dmz::rules;
using namespace dmz::test;
using namespace std::chrono_literals;

const char* const cfg_file = "/tmp/x/cfg.toml";




/// The one diagnostic with `code`; fails the test when there is not exactly one.
const diagnostic& only(const load_result& r, std::string_view code) {
    static const diagnostic none{};
    auto found = with_code(r.diags, code);
    EXPECT_EQ(found.size(), 1u) << "want exactly one " << code << ", got:\n" << dump(r.diags);
    return found.empty() ? none : *found.front();
}

void expect_at(const diagnostic& d, int line, int column) {
    EXPECT_EQ(d.where.file, cfg_file);
    EXPECT_EQ(d.where.line, line) << d.code << " " << d.message;
    EXPECT_EQ(d.where.column, column) << d.code << " " << d.message;
}

void expect_at(const diagnostic& d, text_pos p) {
    expect_at(d, p.line, p.column);
}

load_result load(const std::string& text) {
    return load_instance_config_text(text, cfg_file);
}

// A valid config the cases below start from.
const std::string base = R"([networks.Internal]
ranges = ["10.0.0.0/8"]

[address_sets.relayhosts]
ranges = ["10.1.2.3/32"]

[listeners.web]
protocol = "http"
bind = ["127.0.0.1:8080"]

[groups.admins]

[users.alice]
groups = ["admins"]
)";

TEST(Config, BaseLoadsClean) {
    auto r = load(base + R"(
[[rules]]
name = "OWA"
kind = "web"
action = "allow"
listeners = ["web"]
from = ["Internal", "relayhosts", "External"]
users = ["alice", "*"]
groups = ["admins"]
paths = ["/owa/", "/OWA/x/../y"]
methods = ["GET", "POST"]
target = { address = "10.0.0.5", port = 443, tls = true, name = "Mail.Contoso.com" }
)");
    ASSERT_TRUE(r.parsed);
    ASSERT_TRUE(r.config);
    EXPECT_TRUE(r.diags.empty()) << dump(r.diags);
    auto& c = *r.config;
    EXPECT_EQ(c.name, "cfg"); // named after the file when [instance] gives no name
    ASSERT_EQ(c.networks.size(), 1u);
    EXPECT_EQ(c.networks[0].name, "Internal");
    EXPECT_EQ(c.networks[0].where.line, 1);
    EXPECT_EQ(c.networks[0].where.column, 11);
    ASSERT_EQ(c.listeners.size(), 1u);
    EXPECT_EQ(c.listeners[0].proto, protocol::http);
    ASSERT_EQ(c.listeners[0].bind.size(), 1u);
    EXPECT_EQ(c.listeners[0].bind[0].to_string(), "127.0.0.1:8080");
    ASSERT_EQ(c.rules.size(), 1u);
    auto& ru = c.rules[0];
    EXPECT_EQ(ru.where.line, 16); // the [[rules]] header
    EXPECT_EQ(ru.where.column, 1);
    EXPECT_EQ(ru.act, action::allow);
    EXPECT_EQ(ru.paths, (std::vector<std::string>{"/owa", "/OWA/y"})); // normalized prefixes
    ASSERT_TRUE(ru.to);
    EXPECT_EQ(ru.to->name, "mail.contoso.com");
    EXPECT_EQ(ru.to->port, 443);
    EXPECT_TRUE(ru.to->tls);
}

TEST(Config, TomlSyntaxErrorIsCfg001AndNotParsed) {
    std::string text = "[listeners.web]\nprotocol = = \"http\"\n";
    auto r = load(text);
    EXPECT_FALSE(r.parsed);
    EXPECT_FALSE(r.config);
    auto& d = only(r, "CFG001");
    EXPECT_EQ(d.level, severity::error);
    expect_at(d, 2, 12); // the second '='
    EXPECT_NE(d.message.find("TOML syntax"), std::string::npos);
    EXPECT_EQ(d.where.to_string(), std::string(cfg_file) + ":2:12");

    auto r2 = load("[listeners.web\nprotocol = \"http\"\n");
    EXPECT_FALSE(r2.parsed);
    EXPECT_EQ(only(r2, "CFG001").where.line, 1);
}

TEST(Config, NonAsciiWhereTomlppMisreadsItIsCfg001) {
    // toml++ 3.3 reaches __builtin_unreachable() when it classifies some non-ASCII
    // characters as whitespace or not (found by fuzz_config): the loader stops first.
    auto r = load("[listeners.web]\nprotocol = \"http\"\xc3\xa9\n");
    EXPECT_FALSE(r.parsed);
    expect_at(only(r, "CFG001"), 2, 18);
    EXPECT_NE(only(r, "CFG001").message.find("outside a string"), std::string::npos);
    for (std::string text : {"a = 1\xc3\xa9\n", "i=5'/\xef\xb3\xbf.\n", "K=4.'.{{{\"\xd0\x8a\"\n", "\xcc\xaa"}) {
        auto bad = load(text);
        EXPECT_FALSE(bad.parsed) << text;
        EXPECT_EQ(only(bad, "CFG001").where.line, 1) << text;
    }
    // In a multi-line string, the first character after a line-ending backslash.
    auto ml = load("[instance]\ndescription = \"\"\"\\\n  \xc2\xa7\"\"\"\n");
    EXPECT_FALSE(ml.parsed);
    expect_at(only(ml, "CFG001"), 3, 3);
    EXPECT_NE(only(ml, "CFG001").hint.find("\\uXXXX"), std::string::npos);

    // Everywhere else non-ASCII is fine: strings, comments, a BOM first.
    auto ok = load("\xef\xbb\xbf# Gr\xc3\xbc\xc3\x9f" "e\n[instance]\ndescription = \"B\xc3\xbcro M\xc3\xbcnchen\" # \xc3\xa9\n" +
                   base + "[groups.equipe]\ndescription = \"\"\"Zeile\n\xc3\xbc \\\n  x \xc3\xbc\"\"\"\n" +
                   "[groups.b]\ndescription = '''a\\\n\xc3\xbc'''\n");
    EXPECT_TRUE(ok.parsed) << dump(ok.diags);
    EXPECT_FALSE(has_errors(ok.diags)) << dump(ok.diags);
}

TEST(Config, UnknownKeyIsCfg002WithDidYouMean) {
    std::string text = "[listeners.web]\nprotocl = \"https\"\nbind = [\"127.0.0.1:8443\"]\n";
    auto r = load(text);
    EXPECT_TRUE(r.parsed);
    auto& d = only(r, "CFG002");
    expect_at(d, 2, 1);
    EXPECT_EQ(d.key, "listeners.web.protocl");
    EXPECT_NE(d.hint.find("'protocol'"), std::string::npos) << d.hint;
    // And the key it meant is missing.
    auto& missing = only(r, "CFG008");
    EXPECT_EQ(missing.key, "listeners.web.protocol");

    // Unknown keys at every level, each at the key's position.
    std::string t2 = base + R"(
[[rules]]
name = "OWA"
kind = "web"
action = "allow"
pathes = ["/owa"]
target = { address = "10.0.0.5", port = 80, hostheader = "target" }
)";
    auto r2 = load(t2);
    auto found = with_code(r2.diags, "CFG002");
    ASSERT_EQ(found.size(), 2u) << dump(r2.diags);
    expect_at(*found[0], pos_of(t2, "pathes"));
    EXPECT_EQ(found[0]->key, "rules.OWA.pathes");
    EXPECT_NE(found[0]->hint.find("'paths'"), std::string::npos);
    expect_at(*found[1], pos_of(t2, "hostheader"));
    EXPECT_EQ(found[1]->key, "rules.OWA.target.hostheader");
    EXPECT_NE(found[1]->hint.find("'host_header'"), std::string::npos);

    // Nothing close: the hint lists what is allowed.
    auto r3 = load("[zzzzzzzz]\n");
    auto& d3 = only(r3, "CFG002");
    expect_at(d3, 1, 2);
    EXPECT_NE(d3.hint.find("listeners"), std::string::npos) << d3.hint;
}

TEST(Config, WrongTypeIsCfg003AtTheValue) {
    std::string text = base + R"(
[[rules]]
name = "OWA"
kind = "web"
enabled = "yes"
action = "allow"
target = { address = "10.0.0.5", port = "443" }
)";
    auto r = load(text);
    auto found = with_code(r.diags, "CFG003");
    ASSERT_EQ(found.size(), 2u) << dump(r.diags);
    expect_at(*found[0], pos_of(text, "\"yes\""));
    expect_at(*found[0], 19, 11);
    EXPECT_EQ(found[0]->key, "rules.OWA.enabled");
    EXPECT_NE(found[0]->message.find("true or false"), std::string::npos);
    EXPECT_NE(found[0]->message.find("not a string"), std::string::npos);
    expect_at(*found[1], pos_of(text, "\"443\""));
    EXPECT_EQ(found[1]->key, "rules.OWA.target.port");

    std::string t2 = "[networks.Internal]\nranges = 10\n";
    auto r2 = load(t2);
    auto& d2 = only(r2, "CFG003");
    expect_at(d2, 2, 10);
    EXPECT_EQ(d2.key, "networks.Internal.ranges");
}

TEST(Config, InvalidCidrIsCfg004AtTheElement) {
    std::string text =
        "[networks.Internal]\nranges = [\"10.0.0.0/8\", \"172.16.5.0/12\", \"10.0.0.0/33\"]\n";
    auto r = load(text);
    auto found = with_code(r.diags, "CFG004");
    ASSERT_EQ(found.size(), 2u) << dump(r.diags);
    expect_at(*found[0], 2, 25);
    expect_at(*found[0], pos_of(text, "\"172.16.5.0/12\""));
    EXPECT_EQ(found[0]->key, "networks.Internal.ranges[1]");
    EXPECT_NE(found[0]->message.find("did you mean '172.16.0.0/12'"), std::string::npos)
        << found[0]->message;
    expect_at(*found[1], pos_of(text, "\"10.0.0.0/33\""));
    EXPECT_EQ(found[1]->key, "networks.Internal.ranges[2]");
    // The valid range is kept.
    ASSERT_TRUE(r.config);
    ASSERT_EQ(r.config->networks.size(), 1u);
    EXPECT_EQ(r.config->networks[0].ranges.size(), 1u);
}

TEST(Config, OtherCfg004Values) {
    struct c {
        const char* snippet; ///< appended to `base`
        const char* needle;  ///< where the diagnostic points
        const char* key;
    };
    for (auto [snippet, needle, key] : {
             c{"[listeners.smtp]\nprotocol = \"smtpx\"\nbind = [\"127.0.0.1:25\"]\n", "\"smtpx\"",
               "listeners.smtp.protocol"},
             c{"[listeners.smtp]\nprotocol = \"smtp\"\nbind = [\"::1:25\"]\n", "\"::1:25\"",
               "listeners.smtp.bind[0]"},
             c{"[listeners.smtp]\nprotocol = \"smtp\"\nbind = [\"127.0.0.1\"]\n", "\"127.0.0.1\"]",
               "listeners.smtp.bind[0]"},
             c{"[listeners.smtp]\nprotocol = \"smtp\"\nbind = [\"127.0.0.1:65536\"]\n",
               "\"127.0.0.1:65536\"", "listeners.smtp.bind[0]"},
             c{"[[rules]]\nname = \"R\"\naction = \"deny\"\npaths = [\"/owa/../ecp\"]\n",
               "\"/owa/../ecp\"", "rules.R.paths"},
             c{"[[rules]]\nname = \"R\"\naction = \"deny\"\npaths = [\"/owa?x=1\"]\n",
               "\"/owa?x=1\"", "rules.R.paths"},
             c{"[[rules]]\nname = \"R\"\naction = \"deny\"\nmethods = [\"GE T\"]\n", "\"GE T\"",
               "rules.R.methods"},
             c{"[[rules]]\nname = \"R\"\naction = \"deny\"\npublic_names = "
               "[\"mail..contoso.com\"]\n",
               "\"mail..contoso.com\"", "rules.R.public_names"},
             c{"[[rules]]\nname = \"R\"\naction = \"deny\"\ntarget = { address = \"10.0.0.5\", "
               "port = 80 }\n",
               "target", "rules.R.target"},
             c{"[[rules]]\nname = \"R\"\nkind = \"access\"\naction = \"allow\"\n", "action",
               "rules.R.action"},
             c{"[[rules]]\nname = \"R\"\nkind = \"webb\"\naction = \"allow\"\n", "\"webb\"",
               "rules.R.kind"},
             c{"[[rules]]\nname = \"R\"\naction = \"allow\"\ntarget = { address = \"10.0.0.5\", "
               "port = 70000 }\n",
               "70000", "rules.R.target.port"},
             c{"[[rules]]\nname = \"R\"\naction = \"allow\"\ntarget = { address = \"mail\", port = "
               "80 }\n",
               "address = \"mail\"", "rules.R.target.address"},
         }) {
        std::string text = base + "\n" + snippet;
        auto r = load(text);
        EXPECT_TRUE(r.parsed);
        auto found = with_code(r.diags, "CFG004");
        ASSERT_EQ(found.size(), 1u) << snippet << "\n" << dump(r.diags);
        expect_at(*found[0], pos_of(text, needle));
        EXPECT_EQ(found[0]->key, key) << snippet;
        EXPECT_EQ(r.diags.size(), 1u) << snippet << "\n" << dump(r.diags);
    }
}

TEST(Config, DuplicateNamesAreCfg005) {
    std::string text = R"([networks.Office]
ranges = ["10.0.0.0/8"]

[address_sets.Office]
ranges = ["192.0.2.1/32"]
)";
    auto r = load(text);
    auto& d = only(r, "CFG005");
    expect_at(d, 4, 15); // the address set's name
    EXPECT_EQ(d.key, "address_sets.Office");
    EXPECT_NE(d.message.find("already a network at /tmp/x/cfg.toml:1:11"), std::string::npos)
        << d.message;

    std::string rules = base + R"(
[[rules]]
name = "Block"
action = "deny"

[[rules]]
name = "Block"
action = "deny"
paths = ["/ecp"]
)";
    auto r2 = load(rules);
    auto& d2 = only(r2, "CFG005");
    expect_at(d2, pos_of(rules, "name = \"Block\"", 2));
    EXPECT_EQ(d2.key, "rules.Block.name");
    EXPECT_NE(d2.message.find("already defined at /tmp/x/cfg.toml:" +
                              std::to_string(pos_of(rules, "[[rules]]").line)),
              std::string::npos)
        << d2.message;
    ASSERT_TRUE(r2.config);
    EXPECT_EQ(r2.config->rules.size(), 1u); // the first one stays
}

TEST(Config, DefiningExternalIsCfg005) {
    std::string text = "[networks.External]\nranges = [\"192.0.2.0/24\"]\n";
    auto r = load(text);
    auto& d = only(r, "CFG005");
    expect_at(d, 1, 11);
    EXPECT_EQ(d.key, "networks.External");
    EXPECT_NE(d.message.find("implicit"), std::string::npos);
    EXPECT_TRUE(r.config && r.config->networks.empty());

    // Also as an address set.
    auto r2 = load("[address_sets.External]\nranges = [\"192.0.2.1/32\"]\n");
    expect_at(only(r2, "CFG005"), 1, 15);
}

TEST(Config, OverlappingNetworksAreNet001) {
    std::string text = R"([networks.Internal]
ranges = ["10.0.0.0/8"]

[networks.Lab]
ranges = ["192.168.0.0/16", "10.1.0.0/16"]

[networks.Perimeter]
ranges = ["172.16.0.0/12"]
)";
    auto r = load(text);
    auto& d = only(r, "NET001");
    expect_at(d, 4, 11); // the later network
    EXPECT_EQ(d.key, "networks.Lab");
    EXPECT_NE(d.message.find("10.0.0.0/8"), std::string::npos);
    EXPECT_NE(d.message.find("10.1.0.0/16"), std::string::npos);
    EXPECT_EQ(r.diags.size(), 1u) << dump(r.diags);
}

TEST(Config, DanglingReferencesAreCfg006AtTheElement) {
    std::string text = base + R"(
[[rules]]
name = "OWA"
kind = "web"
action = "allow"
listeners = ["web", "wbe"]
from = ["Internal", "Internl"]
users = ["alice", "alicee"]
groups = ["admin"]
target = { address = "10.0.0.5", port = 80 }

[[rules]]
name = "SMTP"
kind = "server"
action = "allow"
relay_from = ["relayhost"]
target = { address = "10.0.0.5", port = 25 }
)";
    auto r = load(text);
    auto found = with_code(r.diags, "CFG006");
    ASSERT_EQ(found.size(), 5u) << dump(r.diags);
    struct want {
        const char* needle;
        const char* key;
        const char* hint;
    };
    std::vector<want> wants = {
        {"\"wbe\"", "rules.OWA.listeners", "did you mean 'web'?"},
        {"\"Internl\"", "rules.OWA.from", "did you mean 'Internal'?"},
        {"\"alicee\"", "rules.OWA.users", "did you mean 'alice'?"},
        {"\"admin\"", "rules.OWA.groups", "did you mean 'admins'?"},
        {"\"relayhost\"", "rules.SMTP.relay_from", "did you mean 'relayhosts'?"}};
    for (std::size_t i = 0; i < wants.size(); ++i) {
        expect_at(*found[i], pos_of(text, wants[i].needle));
        EXPECT_EQ(found[i]->key, wants[i].key);
        EXPECT_EQ(found[i]->hint, wants[i].hint);
    }
    EXPECT_EQ(r.diags.size(), 5u) << dump(r.diags);
    // Hand-counted: "wbe" is on line 20, column 21.
    expect_at(*found[0], 20, 21);
}

TEST(Config, MissingRequiredKeyIsCfg008) {
    std::string text = base + R"(
[[rules]]
name = "OWA"
kind = "web"
paths = ["/owa"]
)";
    auto r = load(text);
    auto& d = only(r, "CFG008");
    expect_at(d, 16, 1); // the [[rules]] header of the table that lacks it
    EXPECT_EQ(d.key, "rules.OWA.action");
    EXPECT_NE(d.message.find("missing required key 'rules.OWA.action'"), std::string::npos);

    auto r2 = load("[[rules]]\naction = \"deny\"\n");
    auto& d2 = only(r2, "CFG008");
    expect_at(d2, 1, 1);
    EXPECT_EQ(d2.key, "rules[0].name");

    std::string t3 = "[listeners.web]\nprotocol = \"http\"\n";
    auto r3 = load(t3);
    auto& d3 = only(r3, "CFG008");
    EXPECT_EQ(d3.key, "listeners.web.bind");
    EXPECT_EQ(d3.where.line, 1);
}

TEST(Config, AllowRuleWithoutTargetIsCfg008) {
    std::string text = base + R"(
[[rules]]
name = "OWA"
kind = "web"
action = "allow"
paths = ["/owa"]
)";
    auto r = load(text);
    auto& d = only(r, "CFG008");
    expect_at(d, pos_of(text, "[[rules]]"));
    EXPECT_EQ(d.key, "rules.OWA.target");
    EXPECT_NE(d.message.find("needs a target"), std::string::npos);
    EXPECT_EQ(r.diags.size(), 1u) << dump(r.diags);

    // A deny rule needs none.
    auto r2 = load(base + "\n[[rules]]\nname = \"No\"\naction = \"deny\"\n");
    EXPECT_TRUE(r2.diags.empty()) << dump(r2.diags);
}

TEST(Config, HttpsTargetNeedsName) {
    std::string text = base + R"(
[[rules]]
name = "OWA"
action = "allow"
target = { address = "10.0.0.5", port = 443, tls = true }
)";
    auto r = load(text);
    auto& d = only(r, "CFG008");
    expect_at(d, pos_of(text, "{ address"));
    EXPECT_EQ(d.key, "rules.OWA.target.name");
}

class TempDir : public ::testing::Test {
protected:
    void SetUp() override {
        std::string tmpl = (fs::temp_directory_path() / "dmz-config-test-XXXXXX").string();
        ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
        dir_ = tmpl;
    }
    void TearDown() override {
        std::error_code ec;
        if (!dir_.empty())
            fs::remove_all(dir_, ec);
    }
    std::string write(const std::string& name, const std::string& text) {
        auto p = (fs::path(dir_) / name).string();
        std::ofstream(p) << text;
        return p;
    }
    std::string dir_;
};

using ConfigFiles = TempDir;

TEST_F(ConfigFiles, MissingCertificateFileIsCfg007) {
    write("cert.pem", "-----BEGIN CERTIFICATE-----\n");
    std::string text = R"([listeners.web]
protocol = "https"
bind = ["127.0.0.1:8443"]
certificates = [{ names = ["mail.contoso.com"], cert = "cert.pem", key = "missing-key.pem" }]
)";
    auto path = write("cfg.toml", text);
    auto r = load_instance_config(path);
    EXPECT_TRUE(r.parsed);
    auto found = with_code(r.diags, "CFG007");
    ASSERT_EQ(found.size(), 1u) << dump(r.diags);
    EXPECT_EQ(found[0]->where.file, path);
    auto p = pos_of(text, "key = \"missing");
    EXPECT_EQ(found[0]->where.line, 4);
    EXPECT_EQ(found[0]->where.line, p.line);
    EXPECT_EQ(found[0]->where.column, p.column);
    EXPECT_EQ(found[0]->key, "listeners.web.certificates[0].key");
    EXPECT_NE(found[0]->message.find((fs::path(dir_) / "missing-key.pem").string()),
              std::string::npos)
        << found[0]->message;
    EXPECT_EQ(r.diags.size(), 1u) << dump(r.diags);

    // With both files present the listener loads clean, names resolved from the config's folder.
    write("missing-key.pem", "-----BEGIN PRIVATE KEY-----\n");
    auto r2 = load_instance_config(path);
    EXPECT_TRUE(r2.diags.empty()) << dump(r2.diags);
    ASSERT_TRUE(r2.config);
    ASSERT_EQ(r2.config->listeners.size(), 1u);
    ASSERT_EQ(r2.config->listeners[0].certificates.size(), 1u);
    EXPECT_EQ(r2.config->listeners[0].certificates[0].cert_file,
              (fs::path(dir_) / "cert.pem").string());
}

TEST_F(ConfigFiles, UnreadableFileIsCfg007AndNotParsed) {
    auto path = (fs::path(dir_) / "nope.toml").string();
    auto r = load_instance_config(path);
    EXPECT_FALSE(r.parsed);
    EXPECT_FALSE(r.config);
    ASSERT_EQ(r.diags.size(), 1u) << dump(r.diags);
    EXPECT_EQ(r.diags[0].code, "CFG007");
    EXPECT_EQ(r.diags[0].where.file, path);
}

TEST_F(ConfigFiles, SyntaxErrorInAFileNamesTheFile) {
    auto path = write("bad.toml", "[instance]\nname = \"edge\"\nrole = \n");
    auto r = load_instance_config(path);
    EXPECT_FALSE(r.parsed);
    ASSERT_EQ(r.diags.size(), 1u) << dump(r.diags);
    EXPECT_EQ(r.diags[0].code, "CFG001");
    EXPECT_EQ(r.diags[0].where.file, path);
    EXPECT_EQ(r.diags[0].where.line, 3);
}

// ---- The Exchange stanza -------------------------------------------------------------

const std::string exchange_base = R"([listeners.web]
protocol = "http"
bind = ["127.0.0.1:8080"]

[listeners.smtp]
protocol = "smtp"
bind = ["127.0.0.1:2525"]

[[rules]]
name = "Exchange"
kind = "exchange"
listeners = ["web", "smtp"]
domain = "Contoso.com"
target = { address = "10.0.0.5", port = 443, tls = true, name = "mail.contoso.com" }
)";

instance_config load_clean(const std::string& text) {
    auto r = load(text);
    EXPECT_TRUE(r.diags.empty()) << dump(r.diags);
    EXPECT_TRUE(r.config);
    return r.config.value_or(instance_config{});
}

std::vector<std::string> names(const instance_config& c) {
    std::vector<std::string> out;
    for (auto& r : c.rules)
        out.push_back(r.name);
    return out;
}

const rule* find(const instance_config& c, const std::string& name) {
    for (auto& r : c.rules)
        if (r.name == name)
            return &r;
    ADD_FAILURE() << "no rule " << name;
    return nullptr;
}

TEST(Exchange, ExpandsIntoOneRulePerService) {
    auto c = load_clean(exchange_base);
    EXPECT_EQ(names(c), (std::vector<std::string>{"Exchange/owa", "Exchange/activesync",
                                                  "Exchange/outlook_anywhere", "Exchange/mapi",
                                                  "Exchange/ews", "Exchange/autodiscover",
                                                  "Exchange/oab", "Exchange/smtp"}));
    for (auto& r : c.rules) {
        EXPECT_EQ(r.template_rule, "Exchange");
        EXPECT_EQ(r.name, "Exchange/" + r.service);
        EXPECT_EQ(r.act, action::allow);
        EXPECT_TRUE(r.enabled);
        EXPECT_EQ(r.where.line, 9); // the stanza's [[rules]] header
        ASSERT_TRUE(r.to) << r.name;
        EXPECT_EQ(r.to->address, ip_address::parse("10.0.0.5"));
        if (r.service == "smtp")
            continue;
        EXPECT_EQ(r.kind, rule_kind::web);
        EXPECT_TRUE(r.exchange_guards) << r.name;
        EXPECT_EQ(r.listeners, std::vector<std::string>{"web"}) << r.name;
        EXPECT_EQ(r.to->port, 443);
        EXPECT_TRUE(r.to->tls);
        ASSERT_FALSE(r.public_names.empty());
        EXPECT_EQ(r.public_names.front(), "mail.contoso.com"); // mail.<domain>, lower case
    }
}

TEST(Exchange, ServiceDefaults) {
    auto c = load_clean(exchange_base);
    auto* owa = find(c, "Exchange/owa");
    auto* eas = find(c, "Exchange/activesync");
    auto* rpc = find(c, "Exchange/outlook_anywhere");
    auto* mapi = find(c, "Exchange/mapi");
    auto* ews = find(c, "Exchange/ews");
    auto* ad = find(c, "Exchange/autodiscover");
    auto* oab = find(c, "Exchange/oab");
    ASSERT_TRUE(owa && eas && rpc && mapi && ews && ad && oab);

    EXPECT_EQ(owa->paths, std::vector<std::string>{"/owa"});
    EXPECT_EQ(owa->max_body, 35000000u);
    EXPECT_EQ(ews->paths, std::vector<std::string>{"/EWS"});
    EXPECT_EQ(ews->max_body, 64u * 1024 * 1024);
    EXPECT_EQ(eas->paths, std::vector<std::string>{"/Microsoft-Server-ActiveSync"});
    EXPECT_EQ(eas->max_body, 10u * 1024 * 1024);
    EXPECT_EQ(eas->methods, (std::vector<std::string>{"OPTIONS", "POST"}));
    EXPECT_GE(eas->to->timeouts.read,
              std::chrono::milliseconds(3540s)); // a Ping holds up to 3540 s
    EXPECT_EQ(rpc->paths, std::vector<std::string>{"/rpc/rpcproxy.dll"});
    EXPECT_EQ(rpc->methods, (std::vector<std::string>{"RPC_IN_DATA", "RPC_OUT_DATA"}));
    EXPECT_GE(rpc->max_body, 1024ull * 1024 * 1024);
    EXPECT_EQ(mapi->paths, std::vector<std::string>{"/mapi"});
    EXPECT_EQ(ad->paths, std::vector<std::string>{"/autodiscover"});
    EXPECT_NE(
        std::find(ad->public_names.begin(), ad->public_names.end(), "autodiscover.contoso.com"),
        ad->public_names.end());
    EXPECT_EQ(
        std::find(owa->public_names.begin(), owa->public_names.end(), "autodiscover.contoso.com"),
        owa->public_names.end());
    EXPECT_EQ(oab->paths, std::vector<std::string>{"/OAB"});

    auto* smtp = find(c, "Exchange/smtp");
    ASSERT_TRUE(smtp);
    EXPECT_EQ(smtp->kind, rule_kind::server);
    EXPECT_FALSE(smtp->exchange_guards);
    EXPECT_EQ(smtp->listeners, std::vector<std::string>{"smtp"});
    EXPECT_EQ(smtp->accepted_domains, std::vector<std::string>{"contoso.com"});
    EXPECT_TRUE(smtp->relay_from.empty());
    ASSERT_TRUE(smtp->to);
    EXPECT_EQ(smtp->to->port, 25);
    EXPECT_FALSE(smtp->to->tls);
    EXPECT_EQ(smtp->to->mode, server_mode::smtp);
    EXPECT_GE(smtp->to->timeouts.read, std::chrono::milliseconds(600s));

    // The table the defaults come from agrees.
    auto& svcs = exchange_services();
    ASSERT_EQ(svcs.size(), 8u);
    EXPECT_STREQ(svcs[1].key, "ecp");
    EXPECT_FALSE(svcs[1].enabled_by_default);
}

TEST(Exchange, EcpOnlyWhenAskedAndServicesCanBeSwitchedOff) {
    auto c = load_clean(exchange_base + R"(
[rules.services]
ecp = true
owa = false
oab = { enabled = false }
ews = { max_body = "1MiB", timeouts = { read = "5m" } }
)");
    EXPECT_EQ(names(c),
              (std::vector<std::string>{"Exchange/ecp", "Exchange/activesync",
                                        "Exchange/outlook_anywhere", "Exchange/mapi",
                                        "Exchange/ews", "Exchange/autodiscover", "Exchange/smtp"}));
    auto* ecp = find(c, "Exchange/ecp");
    ASSERT_TRUE(ecp);
    EXPECT_EQ(ecp->paths, std::vector<std::string>{"/ecp"});
    auto* ews = find(c, "Exchange/ews");
    ASSERT_TRUE(ews);
    EXPECT_EQ(ews->max_body, 1024u * 1024);
    EXPECT_EQ(ews->to->timeouts.read, std::chrono::milliseconds(300s));
    EXPECT_EQ(ews->where.line, 20); // its own services table
}

TEST(Exchange, NoSmtpRuleWithoutAnSmtpListener) {
    std::string text = exchange_base;
    text.replace(text.find("[\"web\", \"smtp\"]"), 15, "[\"web\"]");
    auto c = load_clean(text);
    EXPECT_EQ(c.rules.size(), 7u);
    EXPECT_EQ(
        std::count_if(c.rules.begin(), c.rules.end(), [](auto& r) { return r.service == "smtp"; }),
        0);
}

TEST(Exchange, UnknownServiceHasDidYouMean) {
    std::string text = exchange_base + "\n[rules.services]\nowaa = true\n";
    auto r = load(text);
    auto& d = only(r, "CFG002");
    expect_at(d, pos_of(text, "owaa"));
    EXPECT_EQ(d.hint, "did you mean 'owa'?");
}

TEST(Exchange, SmtpServiceSettings) {
    auto c = load_clean(R"([address_sets.scanner]
ranges = ["10.9.9.9/32"]
)" + exchange_base + R"(
[rules.services]
smtp = { accepted_domains = ["Contoso.com", "fabrikam.com"], relay_from = ["scanner"], relay_authenticated = false, port = 2525 }
)");
    auto* smtp = find(c, "Exchange/smtp");
    ASSERT_TRUE(smtp);
    EXPECT_EQ(smtp->accepted_domains, (std::vector<std::string>{"contoso.com", "fabrikam.com"}));
    EXPECT_EQ(smtp->relay_from, std::vector<std::string>{"scanner"});
    EXPECT_FALSE(smtp->relay_authenticated);
    EXPECT_EQ(smtp->to->port, 2525);
}

} // namespace

TEST(Exchange, HttpsTargetNameDefaultsToThePublicName) {
    // The stanza verifies the public name on the upstream when the target gives none.
    auto text = exchange_base;
    auto at = text.find(", name = \"mail.contoso.com\"");
    text.erase(at, std::string(", name = \"mail.contoso.com\"").size());
    auto c = load_clean(text + "public_names = [\"webmail.contoso.com\"]\n");
    auto* owa = find(c, "Exchange/owa");
    ASSERT_TRUE(owa && owa->to);
    EXPECT_EQ(owa->to->name, "webmail.contoso.com");
}

namespace {

TEST(Config, FormsSessionSettings) {
    auto r = load(R"([instance]
user_store = "users.toml"
session_key = "keys/session.key"
[listeners.web]
protocol = "http"
bind = ["127.0.0.1:8443"]
authentication = "forms"
session = { idle = "5m", lifetime = "1h", cookie = "OwaSession", same_site = "Strict" }
)");
    ASSERT_TRUE(r.config) << dump(r.diags);
    EXPECT_TRUE(with_code(r.diags, "CFG004").empty()) << dump(r.diags);
    auto& l = r.config->listeners.at(0);
    EXPECT_EQ(l.session.idle, std::chrono::minutes(5));
    EXPECT_EQ(l.session.lifetime, std::chrono::hours(1));
    EXPECT_EQ(l.session.cookie, "OwaSession");
    EXPECT_EQ(l.session.same_site, "Strict");
    EXPECT_EQ(r.config->session_key, "/tmp/x/keys/session.key");

    std::string bad = R"([listeners.web]
protocol = "http"
bind = ["127.0.0.1:8443"]
authentication = "forms"
session = { cookie = "a b", same_site = "None" }
)";
    auto r2 = load(bad);
    auto cookie = with_code(r2.diags, "CFG004");
    ASSERT_EQ(cookie.size(), 2u) << dump(r2.diags);  // the cookie name, and None is not Lax or Strict
    expect_at(*cookie[0], pos_of(bad, "cookie = "));
}

TEST(Config, ExchangeStanzaUsersDoNotApplyToInboundMail) {
    auto r = load(base + R"(
[listeners.smtp]
protocol = "smtp"
bind = ["127.0.0.1:2525"]

[[rules]]
name = "Exchange"
kind = "exchange"
listeners = ["web", "smtp"]
domain = "contoso.com"
users = ["*"]
target = { address = "10.0.0.5", port = 443, tls = true, name = "mail.contoso.com" }
)");
    ASSERT_TRUE(r.config) << dump(r.diags);
    for (auto& ru : r.config->rules) {
        if (ru.service == "smtp") {
            EXPECT_TRUE(ru.users.empty()) << ru.name;
        } else if (!ru.service.empty()) {
            EXPECT_EQ(ru.users, std::vector<std::string>{"*"}) << ru.name;
        }
    }
}

}  // namespace
