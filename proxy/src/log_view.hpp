#pragma once
// The live log view's page (HTML, CSS and JavaScript in one document).

namespace dmz::proxy {

extern const char* const log_view_html;

}  // namespace dmz::proxy
