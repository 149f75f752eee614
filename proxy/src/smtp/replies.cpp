#include "dmz/proxy/smtp/replies.hpp"

namespace dmz::smtp {

std::string recipient_refusal(const rules::decision& d) {
    // RFC 3463 5.7.1: delivery not authorized, for relay refusals and rule denials alike.
    std::string text = "550 5.7.1 " + d.reason;
    if (text.find("rule '") == std::string::npos) text += " (rule '" + d.rule_name + "')";
    return text;
}

std::string connection_refusal(const rules::decision& d, const std::string& host, const std::string& client) {
    return "554 5.7.1 " + host + " does not accept mail from " + client + ": " + d.reason;
}

}  // namespace dmz::smtp
