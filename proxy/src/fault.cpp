#include "fault.hpp"

namespace dmz::proxy {

const char* to_string(fault_class f) {
    switch (f) {
    case fault_class::rule_denied: return "rule-denied";
    case fault_class::no_rule_matched: return "no-rule-matched";
    case fault_class::auth_required: return "auth-required";
    case fault_class::auth_failed: return "auth-failed";
    case fault_class::bad_request: return "bad-request";
    case fault_class::upstream_connect: return "upstream-connect";
    case fault_class::upstream_tls: return "upstream-tls";
    case fault_class::upstream_timeout: return "upstream-timeout";
    case fault_class::upstream_protocol: return "upstream-protocol";
    }
    return "?";
}

const char* reason_phrase(int status) {
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 301: return "Moved Permanently";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 417: return "Expectation Failed";
    case 431: return "Request Header Fields Too Large";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    case 508: return "Loop Detected";
    default: return "Error";
    }
}

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

std::string render_fault(const fault_response& f, const std::string& instance, const std::string& role,
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
