#include "fault.hpp"

#include "http/head_writer.hpp"

namespace dmz::proxy {

using http::reason_phrase;

namespace {
/// Header values and HTML carry only what is safe in each.
std::string header_safe(const std::string& s) {
    std::string out;
    for (unsigned char c : s) out.push_back(c >= 0x20 && c < 0x7f ? static_cast<char>(c) : '?');
    return out;
}
}  // namespace

std::string html_escape(std::string_view s) {
    std::string out;
    for (char c : s) {
        switch (c) {
        case '<': out += "&lt;"; break;
        case '>': out += "&gt;"; break;
        case '&': out += "&amp;"; break;
        case '"': out += "&quot;"; break;
        default: out.push_back(static_cast<unsigned char>(c) >= 0x20 ? c : '?');
        }
    }
    return out;
}

const char* connection_field(bool keep_alive, bool http10) {
    return keep_alive ? (http10 ? "Connection: keep-alive\r\n" : "") : "Connection: close\r\n";
}

std::string render_fault(const rules::fault& f, const std::string& instance, const std::string& role,
                         bool keep_alive, bool http10, const std::string& realm) {
    std::string cls = to_string(f.cls);
    std::string tier = role.empty() ? instance : instance + " (" + role + ")";
    std::string body = "<!DOCTYPE html>\n<html><head><title>" + std::to_string(f.status) + " " + reason_phrase(f.status) +
                       "</title></head><body>\n<h1>" + std::to_string(f.status) + " " + reason_phrase(f.status) +
                       "</h1>\n<p>dmzproxy tier <b>" + html_escape(tier) + "</b> refused this request.</p>\n<p>Fault class: <b>" +
                       cls + "</b></p>\n<p>" + html_escape(f.detail) + "</p>\n" +
                       (f.rule.empty() ? "" : "<p>Rule: <b>" + html_escape(f.rule) + "</b></p>\n") + "</body></html>\n";
    std::string h = std::string(http10 ? "HTTP/1.0 " : "HTTP/1.1 ") + std::to_string(f.status) + " " + reason_phrase(f.status) +
                    "\r\nX-Dmz-Error: " + header_safe(instance) + "; " + cls + "; " + header_safe(f.detail) +
                    (f.rule.empty() ? "" : " (rule '" + header_safe(f.rule) + "')") +
                    "\r\nContent-Type: text/html; charset=utf-8\r\nCache-Control: no-store\r\nContent-Length: " +
                    std::to_string(body.size()) + "\r\n";
    if (f.status == 401)
        h += "WWW-Authenticate: Basic realm=\"" + header_safe(realm.empty() ? instance : realm) + "\", charset=\"UTF-8\"\r\n";
    h += connection_field(keep_alive, http10);
    h += "\r\n";
    return h + body;
}

}  // namespace dmz::proxy
