// Every broken-lab scenario is caught by `check` with the code its header promises, and
// the default lab is clean.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "dmz/rules/lint.hpp"
#include "dmz/topology/topology.hpp"

namespace {

namespace fs = std::filesystem;
using namespace dmz;

std::string dump(const rules::diagnostics& d) {
    std::string out;
    for (auto& x : d)
        out += "  " + x.where.to_string() + " " + rules::to_string(x.level) + " " + x.code + " " +
               x.message + "\n";
    return out;
}

/// What `dmzproxy check -t` does: load, and lint when the load found no errors.
rules::diagnostics check(const std::string& path, bool& parsed) {
    auto r = topology::load(path);
    parsed = r.parsed;
    if (r.topo && !rules::has_errors(r.diags))
        topology::lint(*r.topo, r.diags);
    return r.diags;
}

std::string header_of(const fs::path& p) {
    std::ifstream in(p);
    std::string line, out;
    while (std::getline(in, line) && line.starts_with("#"))
        out += line + "\n";
    return out;
}

struct expectation {
    const char* error;   ///< the error code check reports
    const char* warning; ///< a warning it also reports, or nullptr
};

const std::map<std::string, expectation> expected = {
    {"port-25-conflict", {"TOP001", nullptr}},   {"listener-conflict", {"LST001", nullptr}},
    {"open-relay", {"SMTP001", "SMTP002"}},      {"shadowed-rule", {"RULE001", nullptr}},
    {"test-rule-enabled", {"RULE003", nullptr}}, {"publishing-loop", {"TOP002", nullptr}},
};

TEST(Scenarios, EachReportsItsError) {
    std::vector<fs::path> files;
    for (auto& e : fs::directory_iterator(DMZ_SOURCE_DIR "/topology/scenarios"))
        if (e.path().extension() == ".toml")
            files.push_back(e.path());
    std::sort(files.begin(), files.end());
    ASSERT_GE(files.size(), 6u);

    for (auto& f : files) {
        SCOPED_TRACE(f.string());
        auto stem = f.stem().string();
        auto it = expected.find(stem);
        ASSERT_NE(it, expected.end())
            << "no expectation for scenario '" << stem << "': add it to this test";
        auto& want = it->second;

        // The header comment says what check reports; it must agree with this table.
        auto header = header_of(f);
        EXPECT_NE(header.find("SCENARIO:"), std::string::npos);
        EXPECT_NE(header.find(std::string("error ") + want.error), std::string::npos) << header;
        if (want.warning) {
            EXPECT_NE(header.find(std::string("warning ") + want.warning), std::string::npos)
                << header;
        }

        bool parsed = false;
        auto d = check(f.string(), parsed);
        EXPECT_TRUE(parsed) << dump(d);
        auto has = [&](const char* code, rules::severity level) {
            return std::any_of(d.begin(), d.end(),
                               [&](auto& x) { return x.code == code && x.level == level; });
        };
        EXPECT_TRUE(has(want.error, rules::severity::error))
            << "want error " << want.error << ", got:\n"
            << dump(d);
        if (want.warning) {
            EXPECT_TRUE(has(want.warning, rules::severity::warning))
                << "want warning " << want.warning << ", got:\n"
                << dump(d);
        }
        // The scenario is broken in one way: the only error is the one it is about.
        for (auto& x : d)
            if (x.level == rules::severity::error) {
                EXPECT_EQ(x.code, want.error) << dump(d);
            }
        // Every finding points into the scenario file.
        for (auto& x : d) {
            EXPECT_EQ(fs::path(x.where.file).filename(), f.filename()) << x.code;
            EXPECT_GT(x.where.line, 0) << x.code;
        }
    }
}

TEST(Scenarios, SpecificLocations) {
    bool parsed = false;
    auto d = check(DMZ_SOURCE_DIR "/topology/scenarios/listener-conflict.toml", parsed);
    auto it = std::find_if(d.begin(), d.end(), [](auto& x) { return x.code == "LST001"; });
    ASSERT_NE(it, d.end()) << dump(d);
    EXPECT_EQ(it->key, "listeners.smtp-all.bind");
    EXPECT_NE(it->message.find("0.0.0.0:25"), std::string::npos);
    EXPECT_NE(it->message.find("127.10.0.10:25"), std::string::npos);

    d = check(DMZ_SOURCE_DIR "/topology/scenarios/publishing-loop.toml", parsed);
    it = std::find_if(d.begin(), d.end(), [](auto& x) { return x.code == "TOP002"; });
    ASSERT_NE(it, d.end()) << dump(d);
    EXPECT_NE(it->message.find("back-end -> front-end -> back-end"), std::string::npos)
        << it->message;

    d = check(DMZ_SOURCE_DIR "/topology/scenarios/shadowed-rule.toml", parsed);
    it = std::find_if(d.begin(), d.end(), [](auto& x) { return x.code == "RULE001"; });
    ASSERT_NE(it, d.end()) << dump(d);
    EXPECT_EQ(it->key, "rules.Block ECP from outside");
    EXPECT_NE(it->message.find("'Publish OWA and ECP'"), std::string::npos);

    d = check(DMZ_SOURCE_DIR "/topology/scenarios/port-25-conflict.toml", parsed);
    it = std::find_if(d.begin(), d.end(), [](auto& x) { return x.code == "TOP001"; });
    ASSERT_NE(it, d.end()) << dump(d);
    EXPECT_NE(it->message.find("127.30.0.50:25"), std::string::npos);
    EXPECT_NE(it->hint.find("TransportRole"), std::string::npos);
}

TEST(Scenarios, DefaultTopologyHasNoFindings) {
    bool parsed = false;
    auto d = check(DMZ_SOURCE_DIR "/topology/exchange-two-tier.toml", parsed);
    EXPECT_TRUE(parsed);
    EXPECT_TRUE(d.empty()) << dump(d);
}

} // namespace
