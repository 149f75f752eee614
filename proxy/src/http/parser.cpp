#include "dmz/proxy/http/parser.hpp"

#include <algorithm>
#include <charconv>
#include <cstring>

namespace dmz::http {

namespace {

constexpr bool token_char(unsigned char c) {
    if (c >= 'a' && c <= 'z') return true;
    if (c >= 'A' && c <= 'Z') return true;
    if (c >= '0' && c <= '9') return true;
    switch (c) {
    case '!': case '#': case '$': case '%': case '&': case '\'': case '*': case '+':
    case '-': case '.': case '^': case '_': case '`': case '|': case '~': return true;
    default: return false;
    }
}

constexpr bool field_value_char(unsigned char c) { return c == '\t' || (c >= 0x20 && c != 0x7f); }

/// Byte classes, one table lookup per byte on the per-request path.
struct char_table {
    bool token[256] = {}, value[256] = {};
    constexpr char_table() {
        for (int c = 0; c < 256; ++c) {
            token[c] = token_char(static_cast<unsigned char>(c));
            value[c] = field_value_char(static_cast<unsigned char>(c));
        }
    }
};
constexpr char_table chars;

char lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

bool fail(parse_error& err, int status, const char* code, std::string detail) {
    err.status = status;
    err.code = code;
    err.detail = std::move(detail);
    return false;
}

std::string printable(std::string_view s, std::size_t max = 40) {
    std::string out;
    for (unsigned char c : s.substr(0, max)) {
        if (c >= 0x20 && c < 0x7f) out.push_back(static_cast<char>(c));
        else {
            static constexpr char hex[] = "0123456789abcdef";
            out += "\\x";
            out.push_back(hex[c >> 4]);
            out.push_back(hex[c & 15]);
        }
    }
    if (s.size() > max) out += "...";
    return out;
}

/// Finds the end of the head (the CRLF CRLF), refusing bare CR, bare LF and NUL anywhere
/// before it. Returns the head size, 0 when more bytes are needed, or npos on an error.
std::size_t find_head_end(std::string_view in, std::size_t start, parse_error& err, int status) {
    for (std::size_t i = start; i < in.size(); ++i) {
        // From one CR to the next with memchr (vectorised), then check the span in between
        // for the two bytes a head may not hold.
        const char* base = in.data() + i;
        std::size_t left = in.size() - i;
        auto* cr = static_cast<const char*>(std::memchr(base, '\r', left));
        std::size_t span = cr ? static_cast<std::size_t>(cr - base) : left;
        auto* nul = static_cast<const char*>(std::memchr(base, '\0', span));
        auto* lf = static_cast<const char*>(std::memchr(base, '\n', span));
        if (nul && (!lf || nul < lf)) {
            fail(err, status, "nul-byte", "NUL byte in the message head");
            return std::string_view::npos;
        }
        if (lf) {
            fail(err, status, "bare-lf", "a line ends in LF without CR");
            return std::string_view::npos;
        }
        if (!cr) return 0;
        i += span;
        if (i + 1 >= in.size()) return 0;
        if (in[i + 1] != '\n') {
            fail(err, status, "bare-cr", "a CR not followed by LF");
            return std::string_view::npos;
        }
        if (i + 2 < in.size() && in[i + 2] == '\r') {
            if (i + 3 >= in.size()) return 0;
            if (in[i + 3] != '\n') {
                fail(err, status, "bare-cr", "a CR not followed by LF");
                return std::string_view::npos;
            }
            return i + 4;
        }
        ++i;  // skip the LF
    }
    return 0;
}

/// Whether none of the 8 bytes of `w` is below 0x20 or is 0x7f: a stretch of field value
/// with no tab, CR or control byte (those go through the byte table).
inline bool plain_value_word(std::uint64_t w) {
    constexpr std::uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
    std::uint64_t below = (w - ones * 0x20) & ~w & highs;
    std::uint64_t x = w ^ (ones * 0x7f);
    std::uint64_t del = (x - ones) & ~x & highs;
    return (below | del) == 0;
}

/// One well-formed field line at the start of `lines` ("name:value" up to its CR, with a
/// token name and value bytes only), in one pass. Returns the bytes it used (CRLF
/// included), or 0 for anything else, which the careful path then words as an error.
/// `lines` ends with a CRLF, and every CR in it is followed by LF (find_head_end).
std::size_t plain_field_line(std::string_view lines, field& f) {
    const char* p = lines.data();
    const char* end = p + lines.size();
    const char* q = p;
    while (q < end && chars.token[static_cast<unsigned char>(*q)]) ++q;
    if (q == p || q == end || *q != ':') return 0;
    const char* v = q + 1;
    const char* r = v;
    while (end - r >= 8) {
        std::uint64_t w;
        std::memcpy(&w, r, 8);
        if (!plain_value_word(w)) break;
        r += 8;
    }
    while (r < end && chars.value[static_cast<unsigned char>(*r)]) ++r;
    if (r + 1 >= end || *r != '\r') return 0;
    std::string_view name(p, static_cast<std::size_t>(q - p)), value(v, static_cast<std::size_t>(r - v));
    while (!value.empty() && (value.front() == ' ' || value.front() == '\t')) value.remove_prefix(1);
    while (!value.empty() && (value.back() == ' ' || value.back() == '\t')) value.remove_suffix(1);
    f = {name, value, classify_field(name)};
    return static_cast<std::size_t>(r + 2 - p);
}

/// Why the field line at the start of `lines` is refused: plain_field_line() takes every
/// well-formed line, so this runs only for the first one it did not take.
bool refuse_field_line(std::string_view lines, parse_error& err, int status) {
    auto line = lines.substr(0, lines.find("\r\n"));
    if (line.front() == ' ' || line.front() == '\t')
        return fail(err, status, "obs-fold", "a field line folded onto the next (obs-fold)");
    auto colon = line.find(':');
    if (colon == std::string_view::npos)
        return fail(err, status, "bad-field", "a field line without ':': '" + printable(line) + "'");
    auto name = line.substr(0, colon);
    if (name.empty()) return fail(err, status, "bad-field-name", "an empty field name");
    if (name.back() == ' ' || name.back() == '\t')
        return fail(err, status, "space-before-colon", "whitespace between field name and ':' ('" + printable(name) + "')");
    for (unsigned char c : name)
        if (!chars.token[c]) return fail(err, status, "bad-field-name", "invalid character in field name '" + printable(name) + "'");
    return fail(err, status, "bad-field-value", "control character in the value of '" + std::string(name) + "'");
}

/// Parses field lines from `lines` (each ending in CRLF, the blank line excluded).
bool parse_fields(std::string_view lines, const limits& lim, std::vector<field>& out, parse_error& err, int status) {
    out.clear();
    out.reserve(24);  // one allocation for a typical head, not five as the vector doubles
    while (!lines.empty() && !lines.starts_with("\r\n")) {
        field f;
        auto used = plain_field_line(lines, f);
        if (used == 0) return refuse_field_line(lines, err, status);
        if (out.size() >= lim.max_fields)
            return fail(err, status == 400 ? 431 : status, "too-many-fields", "more than " + std::to_string(lim.max_fields) + " fields");
        out.push_back(f);
        lines.remove_prefix(used);
    }
    return true;
}

/// A fresh head that keeps the field vector's memory.
template <class Head>
void reset(Head& h) {
    auto fields = std::move(h.fields);
    fields.clear();
    h = Head{};
    h.fields = std::move(fields);
}

template <class F>
void for_each_list_item(std::string_view v, F&& f) {
    while (true) {
        auto comma = v.find(',');
        auto item = v.substr(0, comma);
        while (!item.empty() && (item.front() == ' ' || item.front() == '\t')) item.remove_prefix(1);
        while (!item.empty() && (item.back() == ' ' || item.back() == '\t')) item.remove_suffix(1);
        f(item);
        if (comma == std::string_view::npos) break;
        v.remove_prefix(comma + 1);
    }
}

struct framing {
    bool has_te = false, has_cl = false, chunked = false, te_other = false, te_bad = false, cl_bad = false;
    std::uint64_t cl = 0;
    std::string detail;
    std::vector<std::string> connection;
    bool conn_close = false, conn_keep_alive = false, conn_upgrade = false;
};

framing scan_framing(const std::vector<field>& fields) {
    framing f;
    bool cl_seen = false;
    std::vector<std::string_view> codings;
    for (auto& x : fields) {
        if (x.id == field_id::transfer_encoding) {
            f.has_te = true;
            for_each_list_item(x.value, [&](std::string_view c) { codings.push_back(c); });
        } else if (x.id == field_id::content_length) {
            f.has_cl = true;
            for_each_list_item(x.value, [&](std::string_view c) {
                std::uint64_t v = 0;
                auto [p, ec] = std::from_chars(c.data(), c.data() + c.size(), v);
                bool digits = !c.empty() && c.size() <= 18 &&
                              std::all_of(c.begin(), c.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
                if (!digits || ec != std::errc{} || p != c.data() + c.size()) {
                    f.cl_bad = true;
                    f.detail = "malformed Content-Length '" + printable(c) + "'";
                } else if (cl_seen && v != f.cl) {
                    f.cl_bad = true;
                    f.detail = "differing Content-Length values";
                } else {
                    f.cl = v;
                    cl_seen = true;
                }
            });
        } else if (x.id == field_id::connection) {
            for_each_list_item(x.value, [&](std::string_view t) {
                if (t.empty()) return;
                std::string l(t);
                for (auto& ch : l) ch = lower(ch);
                if (l == "close") f.conn_close = true;
                else if (l == "keep-alive") f.conn_keep_alive = true;
                else if (l == "upgrade") f.conn_upgrade = true;
                f.connection.push_back(std::move(l));
            });
        }
    }
    if (f.has_te) {
        if (codings.empty() || codings.back().empty()) {
            f.te_bad = true;
            f.detail = "empty Transfer-Encoding";
        } else if (!iequals(codings.back(), "chunked")) {
            f.te_bad = true;
            f.detail = "Transfer-Encoding whose last coding is not chunked";
        } else {
            f.chunked = true;
            for (std::size_t i = 0; i + 1 < codings.size(); ++i) {
                if (iequals(codings[i], "chunked")) {
                    f.te_bad = true;
                    f.detail = "chunked applied twice";
                } else if (!is_token(codings[i])) {
                    f.te_bad = true;
                    f.detail = "malformed Transfer-Encoding";
                } else {
                    f.te_other = true;
                }
            }
        }
    }
    return f;
}

bool valid_host(std::string_view h) {
    if (h.empty()) return true;
    std::string_view host = h, port;
    if (h.front() == '[') {
        auto close = h.find(']');
        if (close == std::string_view::npos) return false;
        for (char c : h.substr(1, close - 1))
            if (!(std::isxdigit(static_cast<unsigned char>(c)) || c == ':' || c == '.')) return false;
        port = h.substr(close + 1);
        if (!port.empty() && port.front() != ':') return false;
        if (!port.empty()) port.remove_prefix(1);
    } else {
        auto colon = h.rfind(':');
        if (colon != std::string_view::npos) {
            port = h.substr(colon + 1);
            host = h.substr(0, colon);
        }
        if (host.empty()) return false;
        for (char c : host)
            if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' || c == '_')) return false;
        if (colon != std::string_view::npos && port.empty()) return false;
    }
    if (port.size() > 5) return false;
    return std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; });
}

/// "mail.contoso.com:443" vs "MAIL.contoso.com" for https: equal.
bool same_authority(std::string_view a, std::string_view b, bool https) {
    auto strip = [&](std::string_view s) {
        std::string_view def = https ? ":443" : ":80";
        if (s.size() > def.size() && s.ends_with(def)) s.remove_suffix(def.size());
        return s;
    };
    return iequals(strip(a), strip(b));
}

}  // namespace

bool iequals(std::string_view a, std::string_view b) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i)
        if (lower(a[i]) != lower(b[i])) return false;
    return true;
}

bool is_token(std::string_view s) {
    return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return chars.token[static_cast<unsigned char>(c)]; });
}

field_id classify_field(std::string_view n) {
    using enum field_id;
    auto is = [&](std::string_view lower_name) { return iequals(n, lower_name); };
    switch (n.size()) {
    case 2: return is("te") ? te : other;
    case 3: return is("via") ? via : other;
    case 4: return is("host") ? host : other;
    case 6: return is("cookie") ? cookie : is("expect") ? expect : other;
    case 7: return is("trailer") ? trailer : is("upgrade") ? upgrade : other;
    case 9: return is("forwarded") ? forwarded : is("x-rps-cat") ? x_rps_cat : other;
    case 10: return is("connection") ? connection : is("keep-alive") ? keep_alive : other;
    case 13: return is("authorization") ? authorization : other;
    case 14: return is("content-length") ? content_length : other;
    case 15: return is("x-forwarded-for") ? x_forwarded_for : other;
    case 16: return is("proxy-connection") ? proxy_connection : is("www-authenticate") ? www_authenticate
                    : is("x-forwarded-host") ? x_forwarded_host : other;
    case 17: return is("transfer-encoding") ? transfer_encoding : is("x-forwarded-proto") ? x_forwarded_proto : other;
    case 18: return is("proxy-authenticate") ? proxy_authenticate : other;
    case 19: return is("proxy-authorization") ? proxy_authorization : other;
    default: return other;
    }
}

/// The first field's value that `match` takes; empty when none does.
template <class Match>
static std::string_view first_value(const std::vector<field>& fields, Match match) {
    for (auto& f : fields)
        if (match(f)) return f.value;
    return {};
}

static std::string_view first_value(const std::vector<field>& fields, field_id id) {
    return first_value(fields, [&](const field& f) { return f.id == id; });
}

static std::string_view first_value(const std::vector<field>& fields, std::string_view name) {
    return first_value(fields, [&](const field& f) { return iequals(f.name, name); });
}

std::string_view request_head::get(std::string_view name) const { return first_value(fields, name); }

std::string_view request_head::get(field_id id) const { return first_value(fields, id); }

std::size_t request_head::count(field_id id) const {
    return static_cast<std::size_t>(std::count_if(fields.begin(), fields.end(), [&](auto& f) { return f.id == id; }));
}

std::string_view response_head::get(std::string_view name) const { return first_value(fields, name); }

std::string_view response_head::get(field_id id) const { return first_value(fields, id); }

namespace {

/// Refuses early what can never become a request line: a TLS handshake on a plain port,
/// binary, or a line longer than the limit. `line` is the first line so far, without CRLF.
bool refuse_request_line(std::string_view line, const limits& lim, parse_error& err) {
    for (unsigned char c : line)
        if (c < 0x20 || c == 0x7f) {
            if (c == '\r') break;
            if (c == '\n') return fail(err, 400, "bare-lf", "a line ends in LF without CR");
            return fail(err, 400, c == 0x16 ? "tls-on-plain" : "bad-request-line",
                        c == 0x16 ? "a TLS handshake sent to a plain HTTP listener" : "control character in the request line");
        }
    if (line.size() > lim.max_request_line)
        return fail(err, 414, "request-line-too-long", "request line longer than " + std::to_string(lim.max_request_line) + " bytes");
    return true;
}

/// Where the request head that starts at `start` ends (`end`, past its blank line): done,
/// need_more while it may still arrive within the limit, else error.
result request_head_end(std::string_view in, std::size_t start, const limits& lim, std::size_t& end, parse_error& err) {
    end = find_head_end(in, start, err, 400);
    if (end == std::string_view::npos) return result::error;
    if (end == 0 && in.size() <= lim.max_head_bytes) return result::need_more;
    if (end == 0 || end > lim.max_head_bytes) {
        fail(err, 431, "head-too-large", "request head larger than " + std::to_string(lim.max_head_bytes) + " bytes");
        return result::error;
    }
    return result::done;
}

/// method SP request-target SP HTTP-version: the method and version into `out`, the target
/// (characters checked, form not yet) into `target`.
bool parse_request_line(std::string_view line, request_head& out, std::string_view& target, parse_error& err) {
    auto malformed = [&] { return fail(err, 400, "bad-request-line", "malformed request line '" + printable(line) + "'"); };
    auto sp1 = line.find(' ');
    if (sp1 == std::string_view::npos || sp1 == 0) return malformed();
    out.method = line.substr(0, sp1);
    if (!is_token(out.method)) return fail(err, 400, "bad-method", "invalid method '" + printable(out.method) + "'");
    auto rest = line.substr(sp1 + 1);
    auto sp2 = rest.find(' ');
    if (sp2 == std::string_view::npos || sp2 == 0) return malformed();
    target = rest.substr(0, sp2);
    auto version = rest.substr(sp2 + 1);
    for (unsigned char c : target)
        if (c <= 0x20 || c >= 0x7f) return fail(err, 400, "bad-target", "invalid character in the request target");
    if (version == "HTTP/1.1") out.version_minor = 1;
    else if (version == "HTTP/1.0") out.version_minor = 0;
    else if (version.size() == 8 && version.substr(0, 5) == "HTTP/" && std::isdigit(static_cast<unsigned char>(version[5])) &&
             version[6] == '.' && std::isdigit(static_cast<unsigned char>(version[7])))
        return fail(err, 505, "bad-version", "HTTP version " + std::string(version.substr(5)) + " is not supported");
    else
        return malformed();
    return true;
}

/// The request target's form (origin, asterisk, absolute; authority and CONNECT refused)
/// into `out.target`, and for the absolute form `out.authority`, checked against Host.
bool parse_request_target(std::string_view target, std::size_t hosts, request_head& out, parse_error& err) {
    if (target.front() == '/') {
        out.target = target;
    } else if (target == "*") {
        if (out.method != "OPTIONS") return fail(err, 400, "bad-target", "'*' is only valid with OPTIONS");
        out.target = target;
    } else if (target.size() > 8 && (iequals(target.substr(0, 7), "http://") || iequals(target.substr(0, 8), "https://"))) {
        bool https = lower(target[4]) == 's';
        auto after = target.substr(https ? 8 : 7);
        auto slash = after.find_first_of("/?");
        out.authority = after.substr(0, slash);
        if (out.authority.empty() || out.authority.find('@') != std::string_view::npos || !valid_host(out.authority))
            return fail(err, 400, "bad-target", "malformed authority in an absolute-form target");
        if (hosts == 1 && !same_authority(out.authority, out.host, https))
            return fail(err, 400, "authority-mismatch",
                        "absolute-form authority '" + printable(out.authority) + "' disagrees with Host '" + printable(out.host) + "'");
        out.target = slash == std::string_view::npos ? std::string_view("/") : after.substr(slash);
        if (out.target.front() == '?') return fail(err, 400, "bad-target", "absolute-form target without a path");
        if (out.host.empty()) out.host = out.authority;
    } else if (out.method == "CONNECT") {
        return fail(err, 405, "connect-refused", "CONNECT is not served by a publishing proxy");
    } else {
        return fail(err, 400, "bad-target", "request target is neither a path nor an absolute URL");
    }
    return true;
}

/// Body framing, keep-alive, Upgrade and Expect of a parsed request head.
bool request_framing(request_head& out, parse_error& err) {
    auto fr = scan_framing(out.fields);
    if (fr.has_te && fr.has_cl) return fail(err, 400, "cl-and-te", "both Content-Length and Transfer-Encoding");
    if (fr.has_te && out.version_minor == 0) return fail(err, 400, "te-in-http10", "Transfer-Encoding in an HTTP/1.0 request");
    if (fr.te_bad || fr.cl_bad) return fail(err, 400, fr.te_bad ? "bad-transfer-encoding" : "bad-content-length", fr.detail);
    if (fr.te_other) return fail(err, 501, "unsupported-transfer-coding", "transfer codings other than chunked are not supported");
    if (fr.chunked) out.body = body_kind::chunked;
    else if (fr.has_cl && fr.cl > 0) out.body = body_kind::length, out.content_length = fr.cl;
    else out.body = body_kind::none;

    out.connection_tokens = std::move(fr.connection);
    out.keep_alive = out.version_minor == 1 ? !fr.conn_close : (fr.conn_keep_alive && !fr.conn_close);
    out.upgrade = fr.conn_upgrade && out.count(field_id::upgrade) > 0;
    auto expect = out.get(field_id::expect);
    if (!expect.empty()) {
        if (!iequals(expect, "100-continue")) return fail(err, 417, "bad-expect", "unsupported expectation '" + printable(expect) + "'");
        out.expect_continue = out.version_minor == 1;
    }
    return true;
}

}  // namespace

result parse_request(std::string_view in, const limits& lim, request_head& out, parse_error& err) {
    // Tolerate a few empty lines before the request line (RFC 9112 2.2).
    std::size_t start = 0;
    while (start + 1 < in.size() && start < 8 && in[start] == '\r' && in[start + 1] == '\n') start += 2;

    auto first = in.substr(start);
    auto line_end = first.find("\r\n");
    auto line = first.substr(0, line_end);
    if (!refuse_request_line(line, lim, err)) return result::error;
    std::size_t end = 0;
    if (auto r = request_head_end(in, start, lim, end, err); r != result::done) return r;
    reset(out);
    out.head_size = end;

    std::string_view target;
    if (!parse_request_line(line, out, target, err)) return result::error;
    auto fields_text = in.substr(start + line_end + 2, end - (start + line_end + 2));
    if (!parse_fields(fields_text, lim, out.fields, err, 400)) return result::error;

    // Host: exactly one (HTTP/1.1), well formed.
    auto hosts = out.count(field_id::host);
    if (hosts > 1) return fail(err, 400, "repeated-host", "more than one Host field"), result::error;
    if (hosts == 0 && out.version_minor == 1) return fail(err, 400, "missing-host", "HTTP/1.1 request without Host"), result::error;
    out.host = out.get(field_id::host);
    if (!valid_host(out.host)) return fail(err, 400, "bad-host", "malformed Host '" + printable(out.host) + "'"), result::error;

    if (!parse_request_target(target, hosts, out, err) || !request_framing(out, err)) return result::error;
    return result::done;
}

result parse_response(std::string_view in, std::string_view request_method, const limits& lim, response_head& out,
                      parse_error& err) {
    auto end = find_head_end(in, 0, err, 502);
    if (end == std::string_view::npos) return result::error;
    if (end == 0) {
        if (in.size() > lim.max_head_bytes) {
            fail(err, 502, "response-head-too-large", "upstream response head larger than " + std::to_string(lim.max_head_bytes) + " bytes");
            return result::error;
        }
        if (in.size() >= 5 && in.substr(0, 5) != "HTTP/") {
            fail(err, 502, "bad-status-line", "upstream did not answer with HTTP");
            return result::error;
        }
        return result::need_more;
    }
    reset(out);
    out.head_size = end;
    auto line_end = in.find("\r\n");
    auto line = in.substr(0, line_end);
    // HTTP/1.x SP 3DIGIT [SP reason]
    if (line.size() < 12 || line.substr(0, 7) != "HTTP/1." || (line[7] != '0' && line[7] != '1') || line[8] != ' ' ||
        !std::isdigit(static_cast<unsigned char>(line[9])) || !std::isdigit(static_cast<unsigned char>(line[10])) ||
        !std::isdigit(static_cast<unsigned char>(line[11])) || (line.size() > 12 && line[12] != ' '))
        return fail(err, 502, "bad-status-line", "malformed upstream status line '" + printable(line) + "'"), result::error;
    out.version_minor = line[7] - '0';
    out.status = (line[9] - '0') * 100 + (line[10] - '0') * 10 + (line[11] - '0');
    if (out.status < 100) return fail(err, 502, "bad-status-line", "upstream status below 100"), result::error;
    out.reason = line.size() > 13 ? line.substr(13) : std::string_view{};
    for (unsigned char c : out.reason)
        if (!field_value_char(c)) return fail(err, 502, "bad-status-line", "control character in the reason phrase"), result::error;
    if (!parse_fields(in.substr(line_end + 2, end - line_end - 2), lim, out.fields, err, 502)) return result::error;

    auto fr = scan_framing(out.fields);
    out.connection_tokens = std::move(fr.connection);
    out.keep_alive = out.version_minor == 1 ? !fr.conn_close : (fr.conn_keep_alive && !fr.conn_close);
    bool bodiless = request_method == "HEAD" || (out.status >= 100 && out.status < 200) || out.status == 204 || out.status == 304;
    if (fr.has_te && fr.has_cl) return fail(err, 502, "cl-and-te", "upstream sent both Content-Length and Transfer-Encoding"), result::error;
    if (fr.cl_bad || fr.te_bad) {
        if (fr.te_bad && !fr.cl_bad && fr.has_te && !bodiless) {
            // A last coding other than chunked means "read until close" (RFC 9112 6.3).
            out.body = body_kind::until_close;
            out.keep_alive = false;
            return result::done;
        }
        return fail(err, 502, fr.cl_bad ? "bad-content-length" : "bad-transfer-encoding", "upstream: " + fr.detail), result::error;
    }
    if (bodiless) out.body = body_kind::none;
    else if (fr.chunked && !fr.te_other) out.body = body_kind::chunked;
    else if (fr.has_te) out.body = body_kind::until_close, out.keep_alive = false;
    else if (fr.has_cl) out.body = fr.cl ? body_kind::length : body_kind::none, out.content_length = fr.cl;
    else out.body = body_kind::until_close, out.keep_alive = false;
    return result::done;
}

const char* chunked_decoder::framing_byte(unsigned char c, const char*& detail) {
    auto bad = [&](const char* code, const char* what) {
        detail = what;
        return code;
    };
    switch (state_) {
    case state::size: {
        int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (v >= 0) {
            if (++size_digits_ > 15) return bad("chunk-size-overflow", "chunk size too large");
            remaining_ = remaining_ * 16 + static_cast<std::uint64_t>(v);
            break;
        }
        if (size_digits_ == 0) return bad("bad-chunk-size", "chunk size is not hexadecimal");
        if (c == ';') state_ = state::size_ext, line_len_ = 0;
        else if (c == '\r') state_ = state::size_lf;
        else return bad("bad-chunk-size", "unexpected byte after the chunk size");
        break;
    }
    case state::size_ext:
        if (c == '\r') state_ = state::size_lf;
        else if (c == '\n' || (c < 0x20 && c != '\t') || c == 0x7f) return bad("bad-chunk-ext", "control character in a chunk extension");
        else if (++line_len_ > max_line_) return bad("chunk-ext-too-long", "chunk extension too long");
        break;
    case state::size_lf:
        if (c != '\n') return bad("bare-cr", "chunk size line not ended by CRLF");
        size_digits_ = 0;
        if (remaining_ == 0) {
            state_ = state::trailer_line;
            trailer_line_empty_ = true;
            line_len_ = 0;
        } else {
            state_ = state::data;
        }
        break;
    case state::data_cr:
        if (c != '\r') return bad("bad-chunk-end", "chunk data longer than its size");
        state_ = state::data_lf;
        break;
    case state::data_lf:
        if (c != '\n') return bad("bad-chunk-end", "chunk data not ended by CRLF");
        state_ = state::size;
        break;
    case state::trailer_line:
        if (c == '\r') {
            state_ = state::trailer_lf;
        } else if (c == '\n' || c == 0 || (c < 0x20 && c != '\t') || c == 0x7f) {
            return bad("bad-trailer", "control character in a trailer");
        } else {
            trailer_line_empty_ = false;
            if (++trailer_bytes_ > max_trailer_) return bad("trailer-too-large", "trailers too large");
        }
        break;
    case state::trailer_lf:
        if (c != '\n') return bad("bare-cr", "trailer line not ended by CRLF");
        if (trailer_line_empty_) {
            state_ = state::done;
            break;
        }
        state_ = state::trailer_line;
        trailer_line_empty_ = true;
        break;
    case state::data:
    case state::done:
        break;  // feed() handles these without a byte at a time
    }
    return nullptr;
}

bool chunked_decoder::feed(std::string_view in, step& out, parse_error& err) {
    out = step{};
    std::size_t i = 0;
    while (i < in.size()) {
        if (state_ == state::done) {
            out.done = true;
            break;
        }
        if (state_ == state::data) {
            auto n = static_cast<std::size_t>(std::min<std::uint64_t>(remaining_, in.size() - i));
            out.data = in.substr(i, n);
            remaining_ -= n;
            i += n;
            if (remaining_ == 0) state_ = state::data_cr;
            out.consumed = i;
            return true;  // hand the payload to the caller before going on
        }
        const char* detail = nullptr;
        if (auto code = framing_byte(static_cast<unsigned char>(in[i]), detail)) {
            out.consumed = i;
            return fail(err, 400, code, detail);
        }
        ++i;
        if (state_ == state::done) {  // the blank line after the trailers
            out.done = true;
            break;
        }
    }
    out.consumed = i;
    return true;
}

}  // namespace dmz::http
