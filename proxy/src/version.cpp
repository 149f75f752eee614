#include "dmz/proxy/version.hpp"

namespace dmz::proxy {
const char* version_string() { return "dmzproxy 0.1.0"; }
}  // namespace dmz::proxy
