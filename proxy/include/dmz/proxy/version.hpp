#pragma once
namespace dmz::proxy {
/// "dmzproxy 0.1.0"
const char* version_string();
}  // namespace dmz::proxy
