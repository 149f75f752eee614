#include "words.hpp"

#include <array>
#include <charconv>
#include <utility>

#include "dmz/rules/evaluate.hpp"
#include "dmz/rules/path.hpp"

namespace dmz::smtp::detail {

verb to_verb(std::string_view upper) {
    static constexpr std::array<std::pair<std::string_view, verb>, 17> verbs{{
        {"EHLO", verb::ehlo}, {"HELO", verb::helo}, {"STARTTLS", verb::starttls}, {"AUTH", verb::auth},
        {"XCLIENT", verb::xclient}, {"NOOP", verb::noop}, {"RSET", verb::rset}, {"QUIT", verb::quit},
        {"VRFY", verb::vrfy}, {"HELP", verb::help}, {"MAIL", verb::mail}, {"RCPT", verb::rcpt},
        {"DATA", verb::data}, {"BDAT", verb::bdat}, {"EXPN", verb::expn}, {"TURN", verb::turn}, {"ETRN", verb::etrn},
    }};
    for (auto& [name, v] : verbs)
        if (name == upper) return v;
    return verb::unknown;
}

namespace {

// rules::relay_trick's words for a mailbox too long to be one.
bool too_long(const std::string& trick) {
    return trick == "a local part longer than 64 octets" || trick == "a domain longer than 255 octets";
}

}  // namespace

std::string mail_parameters(const command& cmd, std::uint64_t max_message_size, const upstream_capabilities& up,
                            std::string& up_line) {
    for (auto& [k, val] : cmd.params) {
        if (k == "SIZE") {
            std::uint64_t n = 0;
            auto [p, ec] = std::from_chars(val.data(), val.data() + val.size(), n);
            if (ec != std::errc{} || p != val.data() + val.size()) return "501 5.5.4 Bad SIZE parameter";
            if (n > max_message_size)
                return "552 5.3.4 Message size exceeds fixed maximum message size (" + std::to_string(max_message_size) + ")";
            if (up.size) up_line += " SIZE=" + val;
        } else if (k == "BODY") {
            auto b = rules::to_lower(val);
            if (b != "8bitmime" && b != "7bit") return "501 5.5.4 Bad BODY parameter";
            if (up.eight_bit) up_line += b == "7bit" ? " BODY=7BIT" : " BODY=8BITMIME";
        } else {
            return "555 5.5.4 Unsupported parameter " + k;
        }
    }
    if (cmd.path.empty()) return {};
    auto trick = rules::relay_trick(cmd.path);
    if (cmd.path.size() > 256 || too_long(trick))
        return "553 5.1.7 Bad sender address syntax (" + (trick.empty() ? std::string("too long") : trick) + ")";
    return {};
}

std::string recipient_syntax(const command& cmd) {
    if (cmd.path.empty()) return "553 5.1.3 An empty recipient is not a mailbox";
    auto trick = rules::relay_trick(cmd.path);
    if (too_long(trick)) return "553 5.1.3 Bad recipient address syntax (" + trick + ")";
    if (!cmd.params.empty()) return "555 5.5.4 Unsupported parameter " + cmd.params.front().first;
    return {};
}

std::optional<std::uint64_t> bdat_size(std::string_view arg, bool& last) {
    auto sp = arg.find(' ');
    auto num = arg.substr(0, sp);
    std::uint64_t size = 0;
    auto [end, err] = std::from_chars(num.data(), num.data() + num.size(), size);
    bool ok = !num.empty() && num.size() <= 18 && err == std::errc{} && end == num.data() + num.size();
    last = false;
    if (ok && sp != std::string_view::npos) ok = last = rules::to_lower(arg.substr(sp + 1)) == "last";
    if (!ok) return std::nullopt;
    return size;
}

xclient_attributes parse_xclient(std::string_view rest) {
    xclient_attributes x;
    while (!rest.empty()) {
        auto sp = rest.find(' ');
        auto tok = rest.substr(0, sp);
        rest = sp == std::string_view::npos ? std::string_view() : rest.substr(sp + 1);
        if (tok.empty()) continue;
        auto eq = tok.find('=');
        if (eq == std::string_view::npos) return {.login = {}, .error = "501 5.5.4 Bad XCLIENT attribute"};
        if (rules::to_lower(tok.substr(0, eq)) != "login") continue;  // NAME, ADDR, ...: PROXY says those
        auto val = tok.substr(eq + 1);
        if (val == "[UNAVAILABLE]" || val == "[TEMPUNAVAIL]") {
            x.login = "";
        } else if (auto d = xtext_decode(val)) {
            x.login = *d;
        } else {
            return {.login = {}, .error = "501 5.5.4 Bad XCLIENT LOGIN value"};
        }
    }
    return x;
}

}  // namespace dmz::smtp::detail
