#pragma once
/// @file SMTP's own words for a rule decision (rules know no protocol replies).
#include <string>

#include "dmz/rules/evaluate.hpp"

namespace dmz::smtp {

/// The reply to a refused recipient: "550 5.7.1 <why> (rule 'NAME')".
std::string recipient_refusal(const rules::decision& d);

/// The greeting that turns a client away: "554 5.7.1 <host> does not accept mail from ...".
std::string connection_refusal(const rules::decision& d, const std::string& host, const std::string& client);

}  // namespace dmz::smtp
