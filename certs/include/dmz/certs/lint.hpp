#pragma once
/// @file Findings about the certificates a config names, found by loading each one.
#include <ctime>

#include "dmz/rules/diagnostic.hpp"
#include "dmz/rules/model.hpp"

namespace dmz::certs {

/// Loads every certificate and key an instance config names (lab-issued ones excepted: the
/// lab makes them) and appends, at the key's file:line:column:
/// CERT001 unreadable certificate, key or password file; CERT002 missing or wrong password;
/// CERT003 key not matching the certificate; CERT004 expired or not yet valid; CERT005
/// expires within 30 days; CERT006 missing intermediate; CERT007 a name of the certificate
/// entry that the certificate does not carry; CERT008 a rule's public name on an https
/// listener that none of its certificates carries; CERT009 password file open to others.
void lint(const rules::instance_config& c, rules::diagnostics& out, std::time_t now);

/// The same, now.
void lint(const rules::instance_config& c, rules::diagnostics& out);

}  // namespace dmz::certs
