// Forms-session cookies: sealed, refused when touched, readable only with the same key.
#include <gtest/gtest.h>

#include "auth/forms_cookie.hpp"

namespace {

using namespace dmz::proxy;

forms_session sample() {
    forms_session s;
    s.user = "alice";
    s.password = "p\xc3\xa4ss:word";
    s.generation = "0a1b2c3d4e5f";
    s.id = "abc";
    s.issued = 1700000000;
    s.last = 1700000100;
    return s;
}

TEST(Sessions, SealAndUnsealRoundTrip) {
    session_sealer k(std::string(32, 'k'));
    auto v = k.seal(sample());
    EXPECT_EQ(v.rfind("v1.", 0), 0u);
    EXPECT_EQ(v.find("alice"), std::string::npos);  // base64url, not plain
    auto s = k.unseal(v);
    ASSERT_TRUE(s);
    EXPECT_EQ(s->user, "alice");
    EXPECT_EQ(s->password, sample().password);
    EXPECT_EQ(s->generation, "0a1b2c3d4e5f");
    EXPECT_EQ(s->issued, 1700000000);
    EXPECT_EQ(s->last, 1700000100);
    // The password is sealed: two cookies of the same session differ (random IV).
    EXPECT_NE(k.seal(sample()), v);
    for (char c : v) EXPECT_TRUE(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.') << v;
}

TEST(Sessions, AnyChangedByteIsRefused) {
    session_sealer k(std::string(32, 'k'));
    // Many cookies (random IVs), and every character changed to each of several others:
    // base64's spare bits in a last character must not let another spelling through.
    for (int round = 0; round < 20; ++round) {
        auto v = k.seal(sample());
        for (std::size_t i = 0; i < v.size(); ++i)
            for (char c : {'A', 'B', 'C', 'D', 'w', '_'}) {
                if (v[i] == c) continue;
                auto t = v;
                t[i] = c;
                EXPECT_FALSE(k.unseal(t)) << i << " " << c;
            }
    }
    auto v = k.seal(sample());
    EXPECT_FALSE(k.unseal(""));
    EXPECT_FALSE(k.unseal("v1."));
    EXPECT_FALSE(k.unseal(v.substr(0, v.size() - 1)));
}

TEST(Sessions, AnotherKeyRefuses) {
    session_sealer a(std::string(32, 'a')), b(std::string(32, 'b'));
    EXPECT_FALSE(b.unseal(a.seal(sample())));
}

TEST(Sessions, NoPasswordKept) {
    session_sealer k(std::string(32, 'k'));
    auto s = sample();
    s.password.clear();
    auto got = k.unseal(k.seal(s));
    ASSERT_TRUE(got);
    EXPECT_EQ(got->password, "");
}

TEST(Sessions, FormFields) {
    EXPECT_EQ(form_field("username=alice&password=a%26b%3Dc+d", "password"), "a&b=c d");
    EXPECT_EQ(form_field("username=alice", "password"), std::nullopt);
    EXPECT_EQ(form_field("a=1&username=&b=2", "username"), "");
    EXPECT_EQ(form_field("password=%zz", "password"), std::nullopt);
    EXPECT_EQ(form_field("password=%4", "password"), std::nullopt);
    EXPECT_EQ(url_encode("/owa/?a=1&b"), "%2Fowa%2F%3Fa%3D1%26b");
}

TEST(Sessions, Base64Url) {
    for (std::string s : {"", "f", "fo", "foo", "\xff\xfe\xfd"}) EXPECT_EQ(base64url_decode(base64url_encode(s)), s);
    EXPECT_FALSE(base64url_decode("ab+c"));
    EXPECT_FALSE(base64url_decode("ab/c"));
}

TEST(Sessions, HashGenerationChangesWithTheHash) {
    EXPECT_NE(hash_generation("$scrypt$a"), hash_generation("$scrypt$b"));
    EXPECT_EQ(hash_generation("x").size(), 12u);
}

}  // namespace
