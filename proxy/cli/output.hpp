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

void print_explanation(std::ostream& os, const topology::probe& p, const topology::topology& t,
                       const topology::explanation& ex);
nlohmann::json explanation_json(const topology::probe& p, const topology::explanation& ex);

}  // namespace dmz::cli
