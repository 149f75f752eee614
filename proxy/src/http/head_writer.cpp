#include "head_writer.hpp"

#include <charconv>
#include <cstring>

#include "dmz/rules/path.hpp"

namespace dmz::http {

namespace {
bool named_in(const std::vector<std::string>& tokens, std::string_view n) {
    for (auto& t : tokens)
        if (iequals(t, n)) return true;
    return false;
}

std::string_view trim_front(std::string_view s) {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
    return s;
}

/// Adds one Via entry to the Via values already collected.
void add_via(std::string& via, std::string_view value) {
    if (!via.empty()) via += ", ";
    via.append(value);
}
}  // namespace

bool dropped_field(field_id id) {
    using enum field_id;
    switch (id) {
    case connection: case keep_alive: case proxy_connection: case te: case trailer: case transfer_encoding: case upgrade:
    case proxy_authenticate: case proxy_authorization: case content_length: case host: case via: case x_forwarded_for:
    case forwarded: case x_forwarded_proto: case x_forwarded_host:
        return true;
    default:
        return false;
    }
}

void append_field(std::string& out, std::string_view name, std::string_view value) {
    // One resize and two copies, not four appends (a head has a dozen fields, twice per
    // request).
    std::size_t at = out.size();
    out.resize(at + name.size() + value.size() + 4);
    char* p = out.data() + at;
    if (!name.empty()) std::memcpy(p, name.data(), name.size());  // an empty view may hold nullptr
    p += name.size();
    *p++ = ':';
    *p++ = ' ';
    if (!value.empty()) std::memcpy(p, value.data(), value.size());
    p += value.size();
    *p++ = '\r';
    *p = '\n';
}

bool starts_with_nocase(std::string_view s, std::string_view prefix) {
    return s.size() >= prefix.size() && iequals(s.substr(0, prefix.size()), prefix);
}

bool connection_auth(std::string_view v) { return starts_with_nocase(v, "ntlm") || starts_with_nocase(v, "negotiate"); }

std::string host_without_port(std::string_view h) {
    if (!h.empty() && h.front() == '[') {
        auto close = h.find(']');
        return rules::to_lower(h.substr(1, close == std::string_view::npos ? h.size() - 1 : close - 1));
    }
    auto colon = h.rfind(':');
    return rules::to_lower(colon == std::string_view::npos ? h : h.substr(0, colon));
}

bool via_names(std::string_view via, std::string_view name) {
    while (!via.empty()) {
        auto comma = via.find(',');
        auto item = trim_front(via.substr(0, comma));
        auto sp = item.find_first_of(" \t");
        if (sp != std::string_view::npos) {
            auto by = trim_front(item.substr(sp + 1));
            by = by.substr(0, by.find_first_of(" \t"));
            if (iequals(by, name)) return true;
        }
        if (comma == std::string_view::npos) break;
        via.remove_prefix(comma + 1);
    }
    return false;
}

std::string cookie_value(const request_head& head, std::string_view name) {
    for (auto& f : head.fields) {
        if (f.id != field_id::cookie) continue;
        std::string_view c = f.value;
        while (!c.empty()) {
            auto semi = c.find(';');
            auto item = c.substr(0, semi);
            while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
            auto eq = item.find('=');
            if (eq != std::string_view::npos && item.substr(0, eq) == name) return std::string(item.substr(eq + 1));
            if (semi == std::string_view::npos) break;
            c.remove_prefix(semi + 1);
        }
    }
    return "";
}

std::string without_cookie(std::string_view cookies, std::string_view name) {
    std::string out;
    while (!cookies.empty()) {
        auto semi = cookies.find(';');
        auto item = cookies.substr(0, semi);
        while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
        auto eq = item.find('=');
        if (!iequals(item.substr(0, eq), name) && !item.empty()) {
            if (!out.empty()) out += "; ";
            out.append(item);
        }
        if (semi == std::string_view::npos) break;
        cookies.remove_prefix(semi + 1);
    }
    return out;
}

std::string_view last_forwarded_for(const request_head& head) {
    std::string_view last;
    for (auto& f : head.fields)
        if (f.id == field_id::x_forwarded_for) {
            auto comma = f.value.rfind(',');
            last = comma == std::string_view::npos ? f.value : f.value.substr(comma + 1);
        }
    while (!last.empty() && last.front() == ' ') last.remove_prefix(1);
    return last;
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

std::string hex(std::size_t n) {
    char buf[20];
    auto [p, ec] = std::to_chars(buf, buf + sizeof buf, n, 16);
    (void)ec;
    return std::string(buf, p);
}

std::string write_request_head(const request_head& head, const request_rewrite& rw, bool& auth_on_connection) {
    std::string out;
    out.reserve(head.head_size + 256);
    out.append(head.method);
    out += ' ';
    out += rw.path;
    if (!rw.query.empty() || head.target.find('?') != std::string_view::npos) {
        out += '?';
        out += rw.query;
    }
    out += " HTTP/1.1\r\n";
    append_field(out, "Host", rw.host);
    std::string via;
    for (auto& fld : head.fields) {
        if (fld.id == field_id::via) add_via(via, fld.value);
        if (dropped_field(fld.id) || named_in(head.connection_tokens, fld.name)) continue;
        if (fld.id == field_id::authorization) {
            if (rw.delegation == rules::delegation::none || rw.session_replaces_authorization) continue;
            if (rw.delegation == rules::delegation::basic && (!rw.validated_basic || !starts_with_nocase(fld.value, "basic ")))
                continue;
            if (connection_auth(fld.value)) auth_on_connection = true;
        }
        if ((rw.strip_security_token || !rw.session_cookie.empty()) && fld.id == field_id::cookie) {
            // Exchange never sees this tier's session cookie, nor an ECP SecurityToken.
            std::string c(fld.value);
            if (rw.strip_security_token) c = without_cookie(c, "SecurityToken");
            if (!rw.session_cookie.empty()) c = without_cookie(c, rw.session_cookie);
            if (!c.empty()) append_field(out, "Cookie", c);
            continue;
        }
        append_field(out, fld.name, fld.value);
    }
    if (!rw.session_authorization.empty()) append_field(out, "Authorization", rw.session_authorization);
    add_via(via, head.version_minor == 0 ? "1.0 " : "1.1 ");
    via += rw.tier;
    append_field(out, "Via", via);
    if (rw.forwarded) {
        append_field(out, "X-Forwarded-For", rw.client);
        append_field(out, "X-Forwarded-Proto", rw.tls ? "https" : "http");
        append_field(out, "X-Forwarded-Host", head.host);
        std::string fwd = "for=";
        if (rw.client_v6) fwd += "\"[" + std::string(rw.client) + "]\"";
        else fwd += rw.client;
        fwd += rw.tls ? ";proto=https" : ";proto=http";
        append_field(out, "Forwarded", fwd);
    }
    if (head.body == body_kind::length) append_field(out, "Content-Length", std::to_string(head.content_length));
    else if (head.body == body_kind::chunked) append_field(out, "Transfer-Encoding", "chunked");
    out += "\r\n";
    return out;
}

std::string write_response_head(const response_head& resp, const response_rewrite& rw) {
    std::string rh;
    rh.reserve(resp.head_size + 128);
    rh += rw.http10 ? "HTTP/1.0 " : "HTTP/1.1 ";
    rh += std::to_string(resp.status);
    rh += ' ';
    rh.append(resp.reason.empty() ? std::string_view(reason_phrase(resp.status)) : resp.reason);
    rh += "\r\n";
    std::string via;
    for (auto& fld : resp.fields) {
        if (fld.id == field_id::via) add_via(via, fld.value);
        if (dropped_field(fld.id) || named_in(resp.connection_tokens, fld.name)) continue;
        append_field(rh, fld.name, fld.value);
    }
    add_via(via, "1.1 ");
    via += rw.tier;
    append_field(rh, "Via", via);
    if (!rw.set_cookie.empty()) append_field(rh, "Set-Cookie", rw.set_cookie);  // a forms session's refresh
    if (resp.body == body_kind::length) append_field(rh, "Content-Length", std::to_string(resp.content_length));
    else if (rw.chunk_to_client) append_field(rh, "Transfer-Encoding", "chunked");
    else if (rw.request_method == "HEAD" || resp.status == 304) {
        // No body follows, but Content-Length describes the representation: keep it.
        auto cl = resp.get(field_id::content_length);
        if (!cl.empty()) append_field(rh, "Content-Length", cl);
    } else if (resp.body == body_kind::none && resp.status != 204) {
        append_field(rh, "Content-Length", "0");
    }
    if (rw.close_client) append_field(rh, "Connection", "close");
    else if (rw.http10) append_field(rh, "Connection", "keep-alive");
    rh += "\r\n";
    return rh;
}

}  // namespace dmz::http
