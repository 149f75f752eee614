// Fuzz target: the instance config loader (dmz::rules::load_instance_config_text), then,
// for a config without errors, what `dmzproxy check` and `run` do next: lint, compile the
// policy, evaluate. The loader must never crash or throw, and must say where:
// - a TOML syntax error is exactly one CFG001 with file:line:column;
// - every other error names the file, a line and a column (>= 1), a code and a message;
// - loading is deterministic (the same diagnostics twice);
// - evaluation agrees with itself: with and without the trace, the same verdict and rule;
//   an allow names the rule that allowed it, and that rule is one of the config's.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "check.hpp"
#include "dmz/rules/config.hpp"
#include "dmz/rules/evaluate.hpp"
#include "dmz/rules/lint.hpp"

namespace {

using namespace dmz::rules;

const std::string file = "fuzz.toml";

std::string dump(const diagnostics& ds) {
    std::string s;
    for (auto& d : ds)
        s += d.code + ' ' + d.where.to_string() + ' ' + d.key + ' ' + d.message + ' ' + d.hint + '\n';
    return s;
}

void check_located(const diagnostic& d) {
    DMZ_FUZZ_CHECK(!d.code.empty() && !d.message.empty());
    DMZ_FUZZ_CHECK(d.where.file == file);
    DMZ_FUZZ_CHECK(d.where.line >= 1 && d.where.column >= 1);
}

void evaluate_some(const instance_config& c) {
    policy p(c);
    const auto& cfg = p.config();
    auto client = ip_address::parse("127.10.0.5");
    DMZ_FUZZ_CHECK(client.has_value());
    // A few transactions per listener: a web request with everything known, one at the
    // TLS stage (Host unknown), and an SMTP recipient.
    std::size_t n = 0;
    for (auto& l : cfg.listeners) {
        if (++n > 8) break;
        facts web;
        web.listener = l.name;
        web.client = client;
        web.sni = "mail.contoso.com";
        web.host = "mail.contoso.com";
        web.method = "POST";
        web.target = "/Microsoft-Server-ActiveSync?Cmd=Ping&User=u";
        facts tls = web;
        tls.host.reset();
        tls.method.reset();
        tls.target.reset();
        facts smtp;
        smtp.listener = l.name;
        smtp.client = client;
        smtp.mail_from = "a@example.net";
        smtp.rcpt = "b@contoso.com";
        for (auto* f : {&web, &tls, &smtp}) {
            auto traced = p.evaluate(*f);
            evaluate_options quick;
            quick.trace = false;
            auto fast = p.evaluate(*f, quick);
            DMZ_FUZZ_CHECK(traced.result == fast.result && traced.why == fast.why);
            DMZ_FUZZ_CHECK(traced.matched == fast.matched && traced.rule_name == fast.rule_name);
            DMZ_FUZZ_CHECK(!traced.rule_name.empty());
            if (traced.result == verdict::allow) {
                DMZ_FUZZ_CHECK(traced.matched != nullptr && traced.why == fault_class::none);
                bool ours = false;
                for (auto& r : cfg.rules) ours = ours || &r == traced.matched;
                DMZ_FUZZ_CHECK(ours);
            }
            if (traced.result == verdict::deny) DMZ_FUZZ_CHECK(traced.why != fault_class::none);
        }
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::string text(reinterpret_cast<const char*>(data), size);
    auto res = load_instance_config_text(text, file);
    if (!res.parsed) {
        DMZ_FUZZ_CHECK(!res.config.has_value());
        DMZ_FUZZ_CHECK(res.diags.size() == 1 && res.diags[0].code == "CFG001");
        check_located(res.diags[0]);
        return 0;
    }
    DMZ_FUZZ_CHECK(res.config.has_value());
    for (auto& d : res.diags)
        if (d.level == severity::error) check_located(d);
    auto again = load_instance_config_text(text, file);
    DMZ_FUZZ_CHECK(dump(again.diags) == dump(res.diags));

    if (has_errors(res.diags)) return 0;
    diagnostics findings;
    lint(*res.config, findings);
    for (auto& d : findings) DMZ_FUZZ_CHECK(!d.code.empty() && !d.message.empty());
    evaluate_some(*res.config);
    return 0;
}
