// The user store file: read through the config loaders' TOML reader, so a malformed one is
// named by file:line:column and key, and a good one round-trips through save().
#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>

#include "dmz/proxy/users.hpp"

namespace {

using namespace dmz::proxy;
namespace fs = std::filesystem;

class UserStoreFile : public testing::Test {
protected:
    void SetUp() override {
        std::string tmpl = (fs::temp_directory_path() / "dmz-users-test-XXXXXX").string();
        ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
        dir_ = tmpl;
        path_ = dir_ + "/users.toml";
    }
    void TearDown() override { fs::remove_all(dir_); }
    void write(const std::string& text) { std::ofstream(path_) << text; }
    std::string dir_, path_;
};

TEST_F(UserStoreFile, AMissingFileIsAnEmptyStore) {
    dmz::rules::diagnostics d;
    auto s = user_store::load(path_, d);
    ASSERT_TRUE(s);
    EXPECT_TRUE(s->users().empty());
    EXPECT_TRUE(d.empty());
}

TEST_F(UserStoreFile, ATomlSyntaxErrorNamesFileLineAndColumn) {
    write("[users.alice]\npassword = \"$scrypt$x\"\ngroups = [\"a\",\n");
    dmz::rules::diagnostics d;
    EXPECT_FALSE(user_store::load(path_, d));
    ASSERT_EQ(d.size(), 1u);
    EXPECT_EQ(d[0].code, "CFG001");
    EXPECT_EQ(d[0].where.file, path_);
    EXPECT_GT(d[0].where.line, 2);
    EXPECT_GT(d[0].where.column, 0);
    try {
        user_store::load(path_);
        FAIL() << "a malformed store must not load";
    } catch (const std::runtime_error& e) {
        EXPECT_EQ(std::string(e.what()).rfind(path_ + ":" + std::to_string(d[0].where.line) + ":", 0), 0u) << e.what();
    }
}

TEST_F(UserStoreFile, UnknownKeysAndWrongTypesAreErrorsWithTheirKey) {
    write("[users.alice]\npassword = \"$scrypt$x\"\ngruops = [\"a\"]\n\n[users.bob]\npassword = 5\n\n[admins]\nx = 1\n");
    dmz::rules::diagnostics d;
    EXPECT_FALSE(user_store::load(path_, d));
    auto has = [&](const std::string& code, const std::string& key, int line, int column) {
        for (auto& x : d)
            if (x.code == code && x.key == key && x.where.line == line && x.where.column == column) return true;
        return false;
    };
    EXPECT_TRUE(has("CFG002", "users.alice.gruops", 3, 1));  // with a did-you-mean
    EXPECT_TRUE(has("CFG003", "users.bob.password", 6, 12));
    EXPECT_TRUE(has("CFG002", "admins", 8, 2));
    for (auto& x : d) {
        if (x.key == "users.alice.gruops") {
            EXPECT_NE(x.hint.find("groups"), std::string::npos) << x.hint;
        }
    }
}

TEST_F(UserStoreFile, AUserWithoutAPasswordIsAnError) {
    write("[users.carol]\ngroups = [\"mail\"]\n");
    dmz::rules::diagnostics d;
    EXPECT_FALSE(user_store::load(path_, d));
    ASSERT_EQ(d.size(), 1u);
    EXPECT_EQ(d[0].code, "CFG008");
    EXPECT_EQ(d[0].key, "users.carol.password");
    EXPECT_EQ(d[0].where.to_string(), path_ + ":1:1");
}

TEST_F(UserStoreFile, SavedStoresLoadAgainAndVerify) {
    user_store s;
    s.set("alice", "pw", std::vector<std::string>{"mail", "vpn"});
    s.set("a.b", "other", std::nullopt);
    s.save(path_);
    EXPECT_EQ(fs::status(path_).permissions() & fs::perms::all, fs::perms::owner_read | fs::perms::owner_write);
    auto t = user_store::load(path_);
    ASSERT_NE(t.find("alice"), nullptr);
    EXPECT_EQ(t.find("alice")->groups, (std::vector<std::string>{"mail", "vpn"}));
    ASSERT_NE(t.find("a.b"), nullptr);
    EXPECT_TRUE(t.verify("alice", "pw"));
    EXPECT_FALSE(t.verify("alice", "pW"));
    EXPECT_FALSE(t.verify("nobody", "pw"));
}

TEST(PasswordHash, SaltedSoEqualPasswordsDiffer) {
    auto a = hash_password("same"), b = hash_password("same");
    EXPECT_NE(a, b);
    EXPECT_EQ(a.rfind("$scrypt$ln=15,r=8,p=1$", 0), 0u);
    EXPECT_TRUE(check_password("same", a));
}

}  // namespace
