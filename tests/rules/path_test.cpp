// Request-target normalization as IIS will see it, and segment-aware prefix matching.
#include <gtest/gtest.h>

#include <cctype>
#include <cstdio>
#include <ostream>
#include <string>
#include <string_view>

#include "dmz/rules/path.hpp"

namespace {

using dmz::rules::contains_nocase;
using dmz::rules::normalize_target;
using dmz::rules::path_has_prefix;

/// Parameter names for test listings (CTest names): readable and free of characters that
/// need quoting.
std::string safe_name(std::string s) {
    for (auto& ch : s)
        if (!std::isalnum(static_cast<unsigned char>(ch)) &&
            std::string_view("/.-_:%?=&@~*+,!").find(ch) == std::string_view::npos)
            ch = '_';
    return s.empty() ? "empty" : s;
}

struct ok_case {
    const char* target;
    const char* path;
    const char* query;
};

void PrintTo(const ok_case& c, std::ostream* os) {
    *os << safe_name(c.target);
}

class NormalizeOk : public ::testing::TestWithParam<ok_case> {};

TEST_P(NormalizeOk, Path) {
    auto& c = GetParam();
    auto n = normalize_target(c.target);
    EXPECT_TRUE(n.safe()) << c.target << ": " << n.unsafe;
    EXPECT_EQ(n.path, c.path) << c.target;
    EXPECT_EQ(n.query, c.query) << c.target;
}

INSTANTIATE_TEST_SUITE_P(
    Table, NormalizeOk,
    ::testing::Values(ok_case{"/", "/", ""}, ok_case{"/owa/", "/owa/", ""},
                      ok_case{"/owa", "/owa", ""},
                      ok_case{"/OWA", "/OWA", ""}, // case is kept; matching ignores it
                      // Unreserved characters are decoded (RFC 3986 6.2.2.2).
                      ok_case{"/%7Euser", "/~user", ""}, ok_case{"/%7euser", "/~user", ""},
                      ok_case{"/o%77a", "/owa", ""}, ok_case{"/%4F%57%41/", "/OWA/", ""},
                      ok_case{"/owa/a%2Db%5Fc%2Ed", "/owa/a-b_c.d", ""},
                      // Other escapes stay encoded, in upper case.
                      ok_case{"/a%20b", "/a%20b", ""}, ok_case{"/a%2a", "/a%2A", ""},
                      ok_case{"/owa/%c3%a9", "/owa/%C3%A9", ""}, // valid UTF-8 (e-acute)
                      // Dot segments (RFC 3986 5.2.4), inside the first segment.
                      ok_case{"/owa/./x", "/owa/x", ""}, ok_case{"/owa/a/../b", "/owa/b", ""},
                      ok_case{"/owa/a/b/../../c", "/owa/c", ""}, ok_case{"/owa/.", "/owa/", ""},
                      ok_case{"/owa/x/..", "/owa/", ""},
                      ok_case{"/owa/%2e/x", "/owa/x", ""}, // encoded '.' is still a dot segment
                      ok_case{"/owa/a/%2e%2e/b", "/owa/b", ""},
                      ok_case{"/owa/...", "/owa/...", ""}, // not a dot segment
                      ok_case{"/owa/..x", "/owa/..x", ""},
                      // The query is kept as received, without the '?'.
                      ok_case{"/owa/?ae=Folder&t=%41%2f", "/owa/", "ae=Folder&t=%41%2f"},
                      ok_case{"/Microsoft-Server-ActiveSync?Cmd=Ping&User=a",
                              "/Microsoft-Server-ActiveSync", "Cmd=Ping&User=a"},
                      ok_case{"/rpc/rpcproxy.dll?ex01:6001", "/rpc/rpcproxy.dll", "ex01:6001"},
                      ok_case{"/owa/?", "/owa/", ""},
                      ok_case{"/owa?a/../../b", "/owa",
                              "a/../../b"})); // dots in the query are not path

struct refused_case {
    const char* target;
    const char* why; ///< a word the reason must contain
};

void PrintTo(const refused_case& c, std::ostream* os) {
    *os << safe_name(c.target);
}

class NormalizeRefused : public ::testing::TestWithParam<refused_case> {};

TEST_P(NormalizeRefused, Unsafe) {
    auto& c = GetParam();
    auto n = normalize_target(c.target);
    EXPECT_FALSE(n.safe()) << c.target << " normalized to " << n.path;
    EXPECT_NE(n.unsafe.find(c.why), std::string::npos) << c.target << ": " << n.unsafe;
}

INSTANTIATE_TEST_SUITE_P(
    Table, NormalizeRefused,
    ::testing::Values(
        refused_case{"/owa/../ecp/", "escapes"}, refused_case{"/owa/%2e%2e/ecp/", "escapes"},
        refused_case{"/owa/%2E%2E/ecp", "escapes"}, refused_case{"/owa/.%2e/ecp", "escapes"},
        refused_case{"/owa/x/../../ecp", "escapes"}, refused_case{"/owa/..", "escapes"},
        refused_case{"/..", "escapes"}, refused_case{"/../owa", "escapes"},
        refused_case{"/owa/..;/ecp", "parameters"}, refused_case{"/owa/..;x/ecp", "parameters"},
        refused_case{"/owa/.;/x", "parameters"}, refused_case{"/owa\\..\\ecp", "backslash"},
        refused_case{"/owa/%5c", "backslash"}, refused_case{"/owa/%5C..%5Cecp", "backslash"},
        refused_case{"/a%2fb", "encoded '/'"}, refused_case{"/owa%2F..%2Fecp", "encoded '/'"},
        refused_case{"/owa/%252e%252e/ecp", "double encoding"},
        refused_case{"/owa/%2541", "double encoding"}, refused_case{"/owa/%00", "NUL"},
        refused_case{"/owa/%0d%0aX-Injected:1", "control"}, refused_case{"/owa/%7f", "control"},
        refused_case{"/owa/%c0%ae%c0%ae/", "UTF-8"}, // overlong '.'
        refused_case{"/owa/%c0%af", "UTF-8"},        // overlong '/'
        refused_case{"/owa/%e0%80%ae", "UTF-8"},     // three-byte overlong '.'
        refused_case{"/owa/%ed%a0%80", "UTF-8"},     // UTF-16 surrogate
        refused_case{"/owa/%ff", "UTF-8"}, refused_case{"/owa/%c3", "UTF-8"}, // truncated sequence
        refused_case{"/owa/%zz", "malformed"}, refused_case{"/owa/%2", "malformed"},
        refused_case{"/owa/%", "malformed"}, refused_case{"/owa/%u002e", "malformed"}, // IIS %uXXXX
        refused_case{"owa", "start with '/'"}, refused_case{"", "start with '/'"},
        refused_case{"?x=1", "start with '/'"},
        refused_case{"http://mail.contoso.com/owa/", "start with '/'"},
        refused_case{"/owa/#frag", "fragment"}));

TEST(Normalize, DecodedHoldsPathAndQueryDecodedOnce) {
    auto n = normalize_target("/autodiscover/autodiscover.json?@x.com/Powershell");
    EXPECT_TRUE(n.safe());
    EXPECT_EQ(n.decoded, "/autodiscover/autodiscover.json?@x.com/Powershell");
    EXPECT_TRUE(contains_nocase(n.decoded, "powershell"));
    EXPECT_TRUE(contains_nocase(n.decoded, "autodiscover"));

    // The ProxyShell shape hides behind escapes; `decoded` sees through them once.
    auto e = normalize_target("/autodiscover/autodiscover.json?@x.com/%50ower%73hell&Email=a%40b");
    EXPECT_TRUE(contains_nocase(e.decoded, "powershell"));
    EXPECT_EQ(e.query, "@x.com/%50ower%73hell&Email=a%40b"); // raw
    EXPECT_NE(e.decoded.find("Email=a@b"), std::string::npos) << e.decoded;

    auto p = normalize_target("/o%77a/a%20b");
    EXPECT_EQ(p.decoded, "/owa/a b");
    EXPECT_EQ(p.path, "/owa/a%20b");
}

// A plain target (printable ASCII, no escape, fragment, backslash or segment starting with
// '.') takes a one-pass shortcut. Spelling one of its path letters as an unreserved escape
// sends the same target through the full pass: both must agree.
TEST(Normalize, PlainTargetsShortcutAgreesWithTheFullPass) {
    for (std::string t : {"/owa/", "/", "/owa", "/OWA/x", "//owa//x/", "/owa/a.b/c.", "/owa/x..y/", "/ews/Exchange.asmx",
                          "/owa/?ae=Folder&t=IPF.Note", "/owa/?a=b?c", "/Microsoft-Server-ActiveSync?Cmd=Ping&User=a/../b",
                          "/rpc/rpcproxy.dll?ex01.contoso.com:6001", "/owa/~user/+x!$&'()*,;=:@", "/mapi/emsmdb/?MailboxId=a@b.c"}) {
        auto q = t.find('?');
        auto letter = t.find_first_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ");
        auto fast = normalize_target(t);
        EXPECT_TRUE(fast.safe()) << t << ": " << fast.unsafe;
        EXPECT_EQ(fast.decoded, t);
        if (letter == std::string::npos || letter > q) continue;  // "/": no letter in the path
        char hex[4];
        std::snprintf(hex, sizeof hex, "%%%02X", static_cast<unsigned char>(t[letter]));
        auto escaped = t.substr(0, letter) + hex + t.substr(letter + 1);
        auto full = normalize_target(escaped);
        EXPECT_TRUE(full.safe()) << escaped << ": " << full.unsafe;
        EXPECT_EQ(fast.path, full.path) << t;
        EXPECT_EQ(fast.query, full.query) << t;
        EXPECT_EQ(fast.decoded, full.decoded) << t;
    }
    // What the shortcut must leave to the full pass.
    EXPECT_FALSE(normalize_target("/owa/./../../ecp").safe());
    EXPECT_EQ(normalize_target("/owa/.x/").path, "/owa/.x/");
    EXPECT_FALSE(normalize_target("/owa/a\\b").safe());
    EXPECT_FALSE(normalize_target("/owa/#x").safe());
    EXPECT_FALSE(normalize_target(std::string("/owa/\x01")).safe());
}

TEST(Normalize, RefusedTargetsKeepTheRawPath) {
    auto n = normalize_target("/owa/../ecp/?x=1");
    EXPECT_FALSE(n.safe());
    EXPECT_EQ(n.path, "/owa/../ecp/");
    EXPECT_EQ(n.query, "x=1");
}

TEST(PathHasPrefix, CaseInsensitiveOnSegmentBoundary) {
    struct c {
        const char* path;
        const char* prefix;
        bool under;
    };
    for (auto [path, prefix, under] :
         {c{"/owa", "/owa", true}, c{"/OWA", "/owa", true}, c{"/owa/", "/owa", true},
          c{"/OWA/X", "/owa", true}, c{"/owa/x/y", "/owa", true}, c{"/owa", "/OWA", true},
          c{"/owa/x", "/owa/", true}, c{"/owanage", "/owa", false}, c{"/owa2/", "/owa", false},
          c{"/ow", "/owa", false}, c{"/", "/owa", false}, c{"/ecp/", "/owa", false},
          c{"/x/owa", "/owa", false},
          c{"/Microsoft-Server-ActiveSync", "/microsoft-server-activesync", true},
          c{"/anything", "/", true}, c{"/", "/", true}, c{"/x", "", true}}) {
        EXPECT_EQ(path_has_prefix(path, prefix), under) << path << " under " << prefix;
    }
    // A normalized target matches the way IIS maps it.
    EXPECT_TRUE(path_has_prefix(normalize_target("/OWA/./x").path, "/owa"));
    EXPECT_TRUE(path_has_prefix(normalize_target("/o%77a/").path, "/owa"));
    EXPECT_FALSE(path_has_prefix(normalize_target("/owanage/").path, "/owa"));
}

TEST(ContainsNocase, Basics) {
    EXPECT_TRUE(contains_nocase("ABCdef", "cde"));
    EXPECT_TRUE(contains_nocase("x", ""));
    EXPECT_FALSE(contains_nocase("ab", "abc"));
    EXPECT_FALSE(contains_nocase("PowerShel", "powershell"));
    EXPECT_EQ(dmz::rules::to_lower("MiXeD-1"), "mixed-1");
}

} // namespace
