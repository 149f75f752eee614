#pragma once
// The SMTP machine's checks of command arguments, apart from the machine's state.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "dmz/proxy/smtp/machine.hpp"

namespace dmz::smtp::detail {

enum class verb : std::uint8_t {
    ehlo, helo, starttls, auth, xclient, noop, rset, quit, vrfy, help, mail, rcpt, data, bdat, expn, turn, etrn, unknown
};
/// `upper`: the parser's upper-case verb.
verb to_verb(std::string_view upper);

/// MAIL's parameters and sender: "" when acceptable (and `up_line` gains the parameters the
/// upstream understands), else the refusal.
std::string mail_parameters(const command& cmd, std::uint64_t max_message_size, const upstream_capabilities& up,
                            std::string& up_line);

/// RCPT's mailbox and parameters: "" when acceptable, else the refusal.
std::string recipient_syntax(const command& cmd);

/// BDAT's "<size> [LAST]"; nullopt when malformed.
std::optional<std::uint64_t> bdat_size(std::string_view argument, bool& last);

/// XCLIENT's attributes: LOGIN when given ("" for [UNAVAILABLE]), or the refusal.
struct xclient_attributes {
    std::optional<std::string> login;
    std::string error;
};
xclient_attributes parse_xclient(std::string_view argument);

}  // namespace dmz::smtp::detail
