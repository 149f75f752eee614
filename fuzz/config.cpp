// Fuzz target: the instance config loader as `dmzproxy check` and `run` reach it
// (load_instance_config: parse_toml, then load_instance_config_table), then, for a config
// without errors, what they do next: lint, compile the policy, evaluate. The loader must
// never crash or throw, and must say where:
// - a TOML syntax error is exactly one CFG001 with file:line:column;
// - every other error names the file, a line and a column (>= 1), a code and a message;
// - loading is deterministic (the same diagnostics twice from the same parsed table: the
//   TOML is parsed once, as parsing is most of the cost of an input);
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
#include "dmz/rules/toml_reader.hpp"

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DMZ_FUZZ_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define DMZ_FUZZ_ASAN 1
#endif
#ifdef DMZ_FUZZ_ASAN
#include <sanitizer/asan_interface.h>
// An input allocates well under a megabyte, so a 16 MB quarantine still catches a use after
// free within one; ASan's default 256 MB, purged by libFuzzer every second, had each input
// touch fresh pages (a page fault and a memset each), some 15% of this target's time.
// ASAN_OPTIONS still overrides it.
extern "C" const char* __asan_default_options() { return "quarantine_size_mb=16"; }
#endif

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
    std::string_view text(reinterpret_cast<const char*>(data), size);
    diagnostics syntax;
    auto table = parse_toml(text, file, syntax);
    if (!table) {
        DMZ_FUZZ_CHECK(syntax.size() == 1 && syntax[0].code == "CFG001");
        check_located(syntax[0]);
        return 0;
    }
    DMZ_FUZZ_CHECK(syntax.empty());
    auto res = load_instance_config_table(*table, file, ".");
    DMZ_FUZZ_CHECK(res.parsed && res.config.has_value());
    for (auto& d : res.diags)
        if (d.level == severity::error) check_located(d);
    auto again = load_instance_config_table(*table, file, ".");
    DMZ_FUZZ_CHECK(dump(again.diags) == dump(res.diags));

    if (has_errors(res.diags)) return 0;
    diagnostics findings;
    lint(*res.config, findings);
    for (auto& d : findings) DMZ_FUZZ_CHECK(!d.code.empty() && !d.message.empty());
    evaluate_some(*res.config);
    return 0;
}
