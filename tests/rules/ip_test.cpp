// IPv4/IPv6 addresses and CIDR ranges: parsing, containment, overlap, printing.
#include <gtest/gtest.h>

#include <cctype>
#include <ostream>
#include <string>
#include <string_view>

#include "dmz/rules/ip.hpp"

namespace {

using dmz::rules::cidr;
using dmz::rules::ip_address;

ip_address addr(const char* text) {
    auto a = ip_address::parse(text);
    EXPECT_TRUE(a) << text;
    return a.value_or(ip_address{});
}

cidr range(const char* text) {
    std::string err;
    auto c = cidr::parse(text, &err);
    EXPECT_TRUE(c) << text << ": " << err;
    return c.value_or(cidr{});
}

TEST(IpAddress, ParsesIpv4) {
    auto a = addr("10.1.2.3");
    EXPECT_TRUE(a.is_v4());
    EXPECT_FALSE(a.is_unspecified());
    EXPECT_EQ(a.to_string(), "10.1.2.3");
    EXPECT_EQ(a, ip_address::from_v4(0x0a010203));
}

TEST(IpAddress, ParsesIpv6) {
    auto a = addr("2001:db8::1");
    EXPECT_FALSE(a.is_v4());
    EXPECT_EQ(a.to_string(), "2001:db8::1");
    EXPECT_EQ(addr("::1").to_string(), "::1");
}

TEST(IpAddress, AcceptsBrackets) {
    EXPECT_EQ(addr("[::1]"), addr("::1"));
    EXPECT_EQ(addr("[2001:db8::5]").to_string(), "2001:db8::5");
}

TEST(IpAddress, Ipv4MappedIpv6IsIpv4) {
    auto mapped = addr("::ffff:10.1.2.3");
    EXPECT_TRUE(mapped.is_v4());
    EXPECT_EQ(mapped, addr("10.1.2.3"));
    EXPECT_EQ(mapped.to_string(), "10.1.2.3");
}

TEST(IpAddress, Unspecified) {
    EXPECT_TRUE(addr("0.0.0.0").is_unspecified());
    EXPECT_TRUE(addr("::").is_unspecified());
    EXPECT_TRUE(addr("[::]").is_unspecified());
    EXPECT_FALSE(addr("127.0.0.1").is_unspecified());
    EXPECT_FALSE(addr("::1").is_unspecified());
}

TEST(IpAddress, RejectsGarbage) {
    for (const char* bad :
         {"", "10.0.0", "256.1.1.1", "1.2.3.4.5", "10.0.0.1 ", " 10.0.0.1", "abc", "fe80::1%eth0",
          "[::1", "::1]", "[]", "1:2:3:4:5:6:7:8:9", "10.0.0.0/8", "mail.contoso.com"}) {
        EXPECT_FALSE(ip_address::parse(bad)) << "'" << bad << "'";
    }
}

struct contains_case {
    const char* range;
    const char* address;
    bool inside;
};

/// Parameter names for test listings (CTest names): readable and free of characters that
/// need quoting.
std::string safe_name(std::string s) {
    for (auto& ch : s)
        if (!std::isalnum(static_cast<unsigned char>(ch)) &&
            std::string_view("/.-_:%?=&@~*+,!").find(ch) == std::string_view::npos)
            ch = '_';
    return s.empty() ? "empty" : s;
}

void PrintTo(const contains_case& c, std::ostream* os) {
    *os << safe_name(std::string(c.range) + "_has_" + c.address);
}

class CidrContains : public ::testing::TestWithParam<contains_case> {};

TEST_P(CidrContains, Address) {
    auto& c = GetParam();
    EXPECT_EQ(range(c.range).contains(addr(c.address)), c.inside) << c.range << " vs " << c.address;
}

INSTANTIATE_TEST_SUITE_P(
    Table, CidrContains,
    ::testing::Values(
        contains_case{"10.0.0.0/8", "10.1.2.3", true},
        contains_case{"10.0.0.0/8", "11.0.0.0", false},
        contains_case{"10.0.0.0/8", "9.255.255.255", false},
        contains_case{"10.0.0.0/8", "10.255.255.255", true},
        contains_case{"10.0.0.0/8", "::ffff:10.1.2.3", true}, // IPv4-mapped IPv6
        contains_case{"10.0.0.0/8", "::ffff:11.1.2.3", false},
        contains_case{"127.20.0.0/16", "127.20.0.10", true},
        contains_case{"127.20.0.0/16", "127.21.0.10", false},
        contains_case{"0.0.0.0/0", "1.2.3.4", true},
        contains_case{"0.0.0.0/0", "255.255.255.255", true},
        contains_case{"0.0.0.0/0", "2001:db8::1", false}, // v4 "everything" is not v6
        contains_case{"::/0", "2001:db8::1", true},
        contains_case{"::/0", "10.1.2.3", true}, // held as ::ffff:10.1.2.3
        contains_case{"10.1.2.3/32", "10.1.2.3", true},
        contains_case{"10.1.2.3/32", "10.1.2.4", false},
        contains_case{"10.1.2.3", "10.1.2.3", true}, // bare address is a /32
        contains_case{"10.1.2.3", "10.1.2.2", false},
        contains_case{"2001:db8::1/128", "2001:db8::1", true},
        contains_case{"2001:db8::1/128", "2001:db8::2", false}, contains_case{"::1", "::1", true},
        contains_case{"fd00::/8", "fd12:3456::1", true},
        contains_case{"fd00::/8", "fe80::1", false},
        contains_case{"10.0.0.0/9", "10.127.255.255", true}, // prefix not on a byte boundary
        contains_case{"10.0.0.0/9", "10.128.0.0", false}, contains_case{"[::1]", "::1", true}));

TEST(Cidr, PrefixInFamilyTerms) {
    EXPECT_EQ(range("10.0.0.0/8").prefix(), 8);
    EXPECT_EQ(range("10.0.0.0/8").prefix128(), 104);
    EXPECT_EQ(range("10.0.0.0/8").host_bits(), 24);
    EXPECT_EQ(range("0.0.0.0/0").prefix(), 0);
    EXPECT_EQ(range("0.0.0.0/0").host_bits(), 32);
    EXPECT_EQ(range("10.1.2.3").prefix(), 32);
    EXPECT_EQ(range("10.1.2.3").host_bits(), 0);
    EXPECT_EQ(range("::1").prefix(), 128);
    EXPECT_EQ(range("::/0").prefix(), 0);
    EXPECT_EQ(range("::/0").host_bits(), 128);
    EXPECT_EQ(range("fd00::/8").prefix(), 8);
}

TEST(Cidr, HostBitsSetAreRejectedWithDidYouMean) {
    struct c {
        const char* text;
        const char* meant;
    };
    for (auto [text, meant] :
         {c{"10.0.0.1/8", "10.0.0.0/8"}, c{"192.168.1.77/24", "192.168.1.0/24"},
          c{"10.200.0.0/9", "10.128.0.0/9"}, c{"fd00::1/8", "fd00::/8"},
          c{"1.2.3.4/0", "0.0.0.0/0"}}) {
        std::string err;
        EXPECT_FALSE(cidr::parse(text, &err)) << text;
        EXPECT_NE(err.find("host bits"), std::string::npos) << err;
        EXPECT_NE(err.find(std::string("did you mean '") + meant + "'"), std::string::npos)
            << text << ": " << err;
        // What it suggests is itself valid.
        EXPECT_TRUE(cidr::parse(meant)) << meant;
    }
}

TEST(Cidr, BadPrefixesAreRejected) {
    for (const char* bad :
         {"10.0.0.0/33", "10.0.0.0/-1", "10.0.0.0/abc", "10.0.0.0/", "10.0.0.0/8x", "10.0.0.0/ 8",
          "10.0.0.0/+8", "::/129", "::/-1", "fd00::/abc", "10.0.0.0/99999999999"}) {
        std::string err;
        EXPECT_FALSE(cidr::parse(bad, &err)) << bad;
        EXPECT_NE(err.find("prefix length"), std::string::npos) << bad << ": " << err;
    }
}

TEST(Cidr, BadAddressesAreRejected) {
    for (const char* bad :
         {"", "/8", "10.0.0/8", "300.0.0.0/8", "mail.contoso.com/32", "10.0.0.0 /8"}) {
        std::string err;
        EXPECT_FALSE(cidr::parse(bad, &err)) << bad;
        EXPECT_NE(err.find("not an IPv4 or IPv6 address"), std::string::npos) << bad << ": " << err;
    }
    // The error pointer is optional.
    EXPECT_FALSE(cidr::parse("10.0.0.1/8"));
}

TEST(Cidr, ContainsRange) {
    EXPECT_TRUE(range("10.0.0.0/8").contains(range("10.1.0.0/16")));
    EXPECT_FALSE(range("10.1.0.0/16").contains(range("10.0.0.0/8")));
    EXPECT_TRUE(range("10.0.0.0/8").contains(range("10.0.0.0/8")));
    EXPECT_TRUE(range("10.0.0.0/8").contains(range("10.9.9.9/32")));
    EXPECT_FALSE(range("10.0.0.0/8").contains(range("11.0.0.0/16")));
    EXPECT_TRUE(range("0.0.0.0/0").contains(range("127.0.0.0/8")));
    EXPECT_FALSE(range("0.0.0.0/0").contains(range("fd00::/8")));
    EXPECT_TRUE(range("::/0").contains(range("10.0.0.0/8")));
    EXPECT_TRUE(range("fd00::/8").contains(range("fd00:1::/32")));
    EXPECT_FALSE(range("fd00:1::/32").contains(range("fd00::/8")));
}

TEST(Cidr, Overlaps) {
    struct c {
        const char* a;
        const char* b;
        bool overlap;
    };
    for (auto [a, b, overlap] :
         {c{"10.0.0.0/8", "10.1.0.0/16", true}, c{"10.0.0.0/8", "11.0.0.0/8", false},
          c{"10.0.0.0/8", "10.0.0.0/8", true}, c{"127.10.0.0/16", "127.20.0.0/16", false},
          c{"0.0.0.0/0", "192.168.0.0/16", true}, c{"10.0.0.0/9", "10.128.0.0/9", false},
          c{"fd00::/8", "fd00:1::/32", true}, c{"fd00::/8", "fe80::/10", false},
          c{"10.1.2.3", "10.0.0.0/8", true}, c{"10.1.2.3", "10.1.2.4", false}}) {
        EXPECT_EQ(range(a).overlaps(range(b)), overlap) << a << " / " << b;
        EXPECT_EQ(range(b).overlaps(range(a)), overlap) << b << " / " << a; // symmetric
    }
}

TEST(Cidr, ToStringRoundTrips) {
    for (const char* text : {"10.0.0.0/8", "127.10.0.100/32", "0.0.0.0/0", "192.168.1.0/24",
                             "10.128.0.0/9", "fd00::/8", "::/0", "2001:db8::1/128", "::1/128"}) {
        auto c = range(text);
        EXPECT_EQ(c.to_string(), text);
        auto again = cidr::parse(c.to_string());
        ASSERT_TRUE(again) << text;
        EXPECT_EQ(*again, c);
    }
    // Bare addresses print with their family's full prefix.
    EXPECT_EQ(range("10.1.2.3").to_string(), "10.1.2.3/32");
    EXPECT_EQ(range("[::1]").to_string(), "::1/128");
    // A v4-mapped v6 range prints as the IPv4 range it is.
    EXPECT_EQ(range("::ffff:10.0.0.0/104").to_string(), "10.0.0.0/8");
    EXPECT_EQ(range("::ffff:10.0.0.0/104"), range("10.0.0.0/8"));
}

} // namespace
