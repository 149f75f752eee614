#pragma once
/// @file Static checks of one instance's policy: conflicts, shadowing, open relay, loops.
#include "dmz/rules/diagnostic.hpp"
#include "dmz/rules/model.hpp"

namespace dmz::rules {

/// Findings for one instance config, appended to `out`. Codes:
/// LST001 listeners on one address and port; LST002 https listener without a default
/// certificate; SMTP001 open relay; SMTP002 relay range wider than needed; SMTP005 SMTP in
/// tcp mode from External; RULE001 shadowed rule; RULE002 listener unreachable from the
/// rule's sources; RULE003 test rule or allow-everything rule enabled; RULE004 publishing to
/// itself; TRUST001 forwarded addresses trusted from External; EXCH001 ECP published to
/// External; EXCH002 Exchange published over plain HTTP; EXCH003 timeout shorter than an
/// ActiveSync Ping.
void lint(const instance_config& c, diagnostics& out);

/// The networks a source name can hold addresses of (External included when it can).
std::vector<std::string> networks_of_source(const instance_config& c, const std::string& source);

}  // namespace dmz::rules
