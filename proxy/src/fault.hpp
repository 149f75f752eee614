#pragma once
// Responses the proxy makes itself: status, X-Dmz-Error and a short page naming the tier,
// the fault class and the rule.
#include <string>
#include <string_view>

#include "dmz/rules/fault.hpp"

namespace dmz::proxy {

using rules::fault_class;
using rules::make_fault;

/// The whole response, head and body. `keep_alive` false adds Connection: close.
/// `realm`: for 401, the Basic realm to ask for (the instance name when empty).
std::string render_fault(const rules::fault& f, const std::string& instance, const std::string& role,
                         bool keep_alive, bool http10, const std::string& realm = {});


/// Text made safe inside HTML and attribute values (control characters become '?').
std::string html_escape(std::string_view s);

/// The Connection field a generated response needs: close, keep-alive for HTTP/1.0, or none.
const char* connection_field(bool keep_alive, bool http10);

}  // namespace dmz::proxy
