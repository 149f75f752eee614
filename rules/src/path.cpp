#include "dmz/rules/path.hpp"

#include <vector>

namespace dmz::rules {

namespace {

int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

bool is_unreserved(unsigned char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
           c == '-' || c == '.' || c == '_' || c == '~';
}

char lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

/// Decodes every %XX once. Returns false on a malformed escape (including IIS's %uXXXX).
bool percent_decode(std::string_view in, std::string& out) {
    out.clear();
    out.reserve(in.size());
    for (std::size_t i = 0; i < in.size(); ++i) {
        if (in[i] != '%') {
            out.push_back(in[i]);
            continue;
        }
        if (i + 2 >= in.size()) return false;
        int hi = hex_value(in[i + 1]);
        int lo = hex_value(in[i + 2]);
        if (hi < 0 || lo < 0) return false;
        out.push_back(static_cast<char>(hi * 16 + lo));
        i += 2;
    }
    return true;
}

bool has_valid_escape(std::string_view s) {
    for (std::size_t i = 0; i + 2 < s.size(); ++i)
        if (s[i] == '%' && hex_value(s[i + 1]) >= 0 && hex_value(s[i + 2]) >= 0) return true;
    return false;
}

bool valid_utf8(std::string_view s) {
    std::size_t i = 0;
    while (i < s.size()) {
        auto c = static_cast<unsigned char>(s[i]);
        int extra;
        std::uint32_t cp;
        if (c < 0x80) {
            ++i;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            extra = 1;
            cp = c & 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            extra = 2;
            cp = c & 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            extra = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (i + static_cast<std::size_t>(extra) >= s.size()) return false;
        for (int k = 1; k <= extra; ++k) {
            auto cc = static_cast<unsigned char>(s[i + static_cast<std::size_t>(k)]);
            if ((cc & 0xc0) != 0x80) return false;
            cp = (cp << 6) | (cc & 0x3f);
        }
        // Overlong forms ("%c0%ae" for '.') are the classic traversal trick: refuse them.
        if ((extra == 1 && cp < 0x80) || (extra == 2 && cp < 0x800) ||
            (extra == 3 && (cp < 0x10000 || cp > 0x10ffff)) || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += static_cast<std::size_t>(extra) + 1;
    }
    return true;
}

}  // namespace

std::string to_lower(std::string_view s) {
    std::string out(s);
    for (auto& c : out) c = lower(c);
    return out;
}

bool contains_nocase(std::string_view haystack, std::string_view needle) {
    if (needle.empty()) return true;
    if (needle.size() > haystack.size()) return false;
    for (std::size_t i = 0; i + needle.size() <= haystack.size(); ++i) {
        std::size_t k = 0;
        while (k < needle.size() && lower(haystack[i + k]) == needle[k]) ++k;
        if (k == needle.size()) return true;
    }
    return false;
}

normalized_target normalize_target(std::string_view target) {
    normalized_target out;
    // The common case, checked in one pass: printable ASCII with no escape, fragment or
    // backslash, and no segment starting with '.'. Such a path is already normal, and
    // decoding changes nothing; the full pass below gives the same result.
    bool plain = !target.empty() && target.front() == '/';
    for (std::size_t i = 0; plain && i < target.size(); ++i) {
        char c = target[i];
        plain = c > 0x20 && c < 0x7f && c != '%' && c != '#' && c != '\\' && !(c == '.' && target[i - 1] == '/');
    }
    if (plain) {
        auto q = target.find('?');
        out.path = std::string(target.substr(0, q));
        if (q != std::string_view::npos) out.query = std::string(target.substr(q + 1));
        out.decoded = std::string(target);
        return out;
    }
    auto qpos = target.find('?');
    std::string_view raw_path = target.substr(0, qpos);
    if (qpos != std::string_view::npos) out.query = std::string(target.substr(qpos + 1));

    std::string decoded_path, decoded_query;
    bool path_ok = percent_decode(raw_path, decoded_path);
    bool query_ok = percent_decode(out.query, decoded_query);
    out.decoded = path_ok ? decoded_path : std::string(raw_path);
    if (qpos != std::string_view::npos) {
        out.decoded += '?';
        out.decoded += query_ok ? decoded_query : out.query;
    }

    auto refuse = [&](std::string why) {
        out.unsafe = std::move(why);
        out.path = std::string(raw_path);
        return out;
    };
    if (raw_path.empty() || raw_path.front() != '/')
        return refuse("the path does not start with '/'");
    if (!path_ok) return refuse("malformed percent-encoding in the path");
    if (target.find('#') != std::string_view::npos) return refuse("a fragment in the request");
    for (unsigned char c : decoded_path) {
        if (c == 0) return refuse("a NUL byte in the path");
        if (c == '\\') return refuse("a backslash in the path");
        if (c < 0x20 || c == 0x7f) return refuse("a control character in the path");
    }
    if (!valid_utf8(decoded_path)) return refuse("invalid or overlong UTF-8 in the path");
    if (has_valid_escape(decoded_path))
        return refuse("the path decodes differently a second time (double encoding)");

    // Pass over the raw path: decode unreserved escapes, upper-case the rest, and refuse
    // an encoded '/' so that the segments we see are the segments the upstream sees.
    std::string norm;
    norm.reserve(raw_path.size());
    for (std::size_t i = 0; i < raw_path.size(); ++i) {
        char c = raw_path[i];
        if (c != '%') {
            norm.push_back(c);
            continue;
        }
        auto v = static_cast<unsigned char>(hex_value(raw_path[i + 1]) * 16 + hex_value(raw_path[i + 2]));
        if (v == '/') return refuse("an encoded '/' (%2F) in the path");
        if (is_unreserved(v)) {
            norm.push_back(static_cast<char>(v));
        } else {
            static constexpr char digits[] = "0123456789ABCDEF";
            norm.push_back('%');
            norm.push_back(digits[v >> 4]);
            norm.push_back(digits[v & 15]);
        }
        i += 2;
    }

    // Remove dot-segments. A ".." that climbs out of the first segment (the virtual
    // directory) escapes its prefix; "..;x" is a dot-segment to some servers and not to
    // others, so it is refused outright.
    std::vector<std::string_view> segs;
    std::string_view rest(norm);
    rest.remove_prefix(1);
    bool trailing_slash = false;
    while (true) {
        auto slash = rest.find('/');
        std::string_view seg = rest.substr(0, slash);
        std::string_view name = seg.substr(0, seg.find(';'));
        bool last = slash == std::string_view::npos;
        if (name != seg && (name == "." || name == ".."))
            return refuse("a dot-segment with parameters ('" + std::string(seg) + "')");
        if (seg == ".") {
            trailing_slash = last;
        } else if (seg == "..") {
            if (segs.size() <= 1) return refuse("'..' escapes its directory");
            segs.pop_back();
            trailing_slash = last;
        } else {
            segs.push_back(seg);
            trailing_slash = false;
        }
        if (last) break;
        rest.remove_prefix(slash + 1);
    }
    std::string path;
    path.reserve(norm.size());
    for (auto s : segs) {
        path.push_back('/');
        path.append(s);
    }
    if (path.empty() || trailing_slash) path.push_back('/');
    out.path = std::move(path);
    return out;
}

bool path_has_prefix(std::string_view path, std::string_view prefix) {
    while (prefix.size() > 1 && prefix.back() == '/') prefix.remove_suffix(1);
    if (prefix == "/" || prefix.empty()) return true;
    if (path.size() < prefix.size()) return false;
    for (std::size_t i = 0; i < prefix.size(); ++i)
        if (lower(path[i]) != lower(prefix[i])) return false;
    return path.size() == prefix.size() || path[prefix.size()] == '/';
}

}  // namespace dmz::rules
