#pragma once
// Rendering of findings, rule tables and explanations for the command line (text and JSON).
#include <nlohmann/json.hpp>

#include <iosfwd>

#include "dmz/rules/diagnostic.hpp"
#include "dmz/rules/model.hpp"
#include "dmz/topology/explain.hpp"

namespace dmz::cli {

void print_diagnostics(std::ostream& os, const rules::diagnostics& d);
nlohmann::json diagnostics_json(const rules::diagnostics& d);

void print_rules(std::ostream& os, const rules::instance_config& c);
nlohmann::json rules_json(const rules::instance_config& c);

/// The probe of explain and diagnose: `what` is a URL, smtp:RECIPIENT, or smtp /
/// smtp:SERVER[:PORT] with `rcpt`. Throws std::invalid_argument (a usage error) otherwise.
topology::probe make_probe(const std::string& command_name, const std::string& what, const std::string& from,
                           const std::string& method, const std::string& mail_from, std::string rcpt);

void print_explanation(std::ostream& os, const topology::probe& p, const topology::topology& t,
                       const topology::explanation& ex);
nlohmann::json explanation_json(const topology::probe& p, const topology::explanation& ex);

}  // namespace dmz::cli
