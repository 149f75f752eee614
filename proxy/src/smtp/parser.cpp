#include "dmz/proxy/smtp/parser.hpp"

#include <arpa/inet.h>

#include <algorithm>
#include <cstring>

namespace dmz::smtp {

namespace {
char upper(char c) { return (c >= 'a' && c <= 'z') ? static_cast<char>(c - 'a' + 'A') : c; }
bool iprefix(std::string_view s, std::string_view p) {
    if (s.size() < p.size()) return false;
    for (std::size_t i = 0; i < p.size(); ++i)
        if (upper(s[i]) != upper(p[i])) return false;
    return true;
}
constexpr unsigned char v2_signature[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};
}  // namespace

line_result next_line(std::string_view in, std::size_t max_len, std::string_view& line, std::size_t& consumed) {
    for (std::size_t i = 0; i < in.size(); ++i) {
        char c = in[i];
        if (c == '\n') return line_result::bare_lf;
        if (c == '\r') {
            if (i + 2 > max_len) return line_result::too_long;
            if (i + 1 >= in.size()) return line_result::need_more;
            if (in[i + 1] != '\n') return line_result::bare_cr;
            line = in.substr(0, i);
            consumed = i + 2;
            return line_result::line;
        }
        if (i + 2 >= max_len) return line_result::too_long;  // i+1 octets and a CRLF would not fit
    }
    return line_result::need_more;
}

bool parse_command(std::string_view line, command& out, std::string& err) {
    out = command{};
    auto sp = line.find(' ');
    auto verb = line.substr(0, sp);
    if (verb.empty() || verb.size() > 16) {
        err = "500 5.5.2 Syntax error, command unrecognized";
        return false;
    }
    for (char c : verb) {
        if (!std::isalpha(static_cast<unsigned char>(c))) {
            err = "500 5.5.2 Syntax error, command unrecognized";
            return false;
        }
        out.verb.push_back(upper(c));
    }
    out.argument = sp == std::string_view::npos ? "" : std::string(line.substr(sp + 1));
    if (out.verb != "MAIL" && out.verb != "RCPT") return true;

    // MAIL FROM:<path> [params] / RCPT TO:<path> [params]
    std::string_view arg = out.argument;
    std::string_view keyword = out.verb == "MAIL" ? "FROM:" : "TO:";
    if (!iprefix(arg, keyword)) {
        err = std::string("501 5.5.4 Syntax: ") + (out.verb == "MAIL" ? "MAIL FROM:<address>" : "RCPT TO:<address>");
        return false;
    }
    arg.remove_prefix(keyword.size());
    while (!arg.empty() && arg.front() == ' ') arg.remove_prefix(1);  // common, though not RFC
    if (arg.empty() || arg.front() != '<') {
        err = "501 5.5.4 Syntax: the address must be in angle brackets";
        return false;
    }
    // The closing '>' outside a quoted local part.
    std::size_t close = std::string_view::npos;
    bool quoted = false;
    for (std::size_t i = 1; i < arg.size(); ++i) {
        if (arg[i] == '\\' && quoted) {
            ++i;
            continue;
        }
        if (arg[i] == '"') quoted = !quoted;
        if (arg[i] == '>' && !quoted) {
            close = i;
            break;
        }
    }
    if (close == std::string_view::npos) {
        err = "501 5.5.4 Syntax: unterminated address";
        return false;
    }
    out.path = std::string(arg.substr(1, close - 1));
    auto rest = arg.substr(close + 1);
    while (!rest.empty()) {
        while (!rest.empty() && rest.front() == ' ') rest.remove_prefix(1);
        if (rest.empty()) break;
        auto end = rest.find(' ');
        auto p = rest.substr(0, end);
        auto eq = p.find('=');
        std::string key;
        for (char c : p.substr(0, eq)) key.push_back(upper(c));
        if (key.empty() || !std::all_of(key.begin(), key.end(), [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '-'; })) {
            err = "501 5.5.4 Syntax error in parameters";
            return false;
        }
        out.params.emplace_back(key, eq == std::string_view::npos ? "" : std::string(p.substr(eq + 1)));
        if (end == std::string_view::npos) break;
        rest.remove_prefix(end);
    }
    return true;
}

std::string reply::text() const {
    std::string out;
    for (std::size_t i = 0; i < lines.size(); ++i) out += (i ? " / " : "") + lines[i];
    return out;
}

std::string reply::wire() const {
    std::string out;
    auto c = std::to_string(code);
    if (lines.empty()) return c + "\r\n";
    for (std::size_t i = 0; i < lines.size(); ++i) out += c + (i + 1 < lines.size() ? "-" : " ") + lines[i] + "\r\n";
    return out;
}

int parse_reply(std::string_view in, reply& out, std::size_t& consumed) {
    out = reply{};
    std::size_t pos = 0;
    while (true) {
        std::string_view line;
        std::size_t used = 0;
        auto r = next_line(in.substr(pos), max_text_line, line, used);
        if (r == line_result::need_more) return 0;
        if (r != line_result::line) return -1;
        // Reply-code = %x32-35 %x30-35 %x30-39 (RFC 5321 4.2): anything else ("019", "600")
        // could not be relayed as it came (wire() writes the code as a number).
        if (line.size() < 3 || line[0] < '2' || line[0] > '5' || line[1] < '0' || line[1] > '5' ||
            !std::isdigit(static_cast<unsigned char>(line[2])))
            return -1;
        int code = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
        if (out.code && code != out.code) return -1;
        out.code = code;
        pos += used;
        if (line.size() == 3) {
            out.lines.emplace_back();
            consumed = pos;
            return 1;
        }
        if (line[3] != ' ' && line[3] != '-') return -1;
        out.lines.emplace_back(line.substr(4));
        if (line[3] == ' ') {
            consumed = pos;
            return 1;
        }
        if (out.lines.size() > 100) return -1;
    }
}

std::size_t data_reader::feed(std::string_view in) {
    std::size_t i = 0;
    while (i < in.size() && !done_) {
        char c = in[i++];
        if (pending_cr_) {
            pending_cr_ = false;
            if (c != '\n') {
                refuse("554 5.6.0 Message refused: a bare CR is not a line ending (SMTP smuggling shape)");
                // The CR stays part of the line; look at this byte afresh.
                --i;
                line_.push_back('\r');
                ++line_len_;
                continue;
            }
            // A complete line in line_ (without CRLF).
            if (!raw_ && line_ == ".") {
                done_ = true;
                break;
            }
            // In DATA the dot that stuffing added is not part of the line (RFC 5321 4.5.2).
            std::size_t stuffed_dot = !raw_ && !line_.empty() && line_[0] == '.' ? 1 : 0;
            if (line_len_ - stuffed_dot + 2 > max_text_line) refuse("554 5.6.0 Message refused: a line longer than 1000 octets");
            size_ += line_.size() + 2;
            if (size_ > max_size_) refuse("552 5.3.4 Message size exceeds fixed maximum message size");
            if (refusal_.empty()) {
                message_ += line_;
                message_ += "\r\n";
            }
            line_.clear();
            line_len_ = 0;
            continue;
        }
        if (c == '\r') {
            pending_cr_ = true;
            continue;
        }
        if (c == '\n') {
            // Not a line ending: "\n.\n" and friends must never end a message here, or
            // anywhere further along.
            refuse("554 5.6.0 Message refused: a bare LF is not a line ending (SMTP smuggling shape)");
        }
        ++line_len_;
        if (line_.size() < max_text_line + 2) line_.push_back(c);  // keep memory bounded on absurd lines
    }
    if (!refusal_.empty()) std::string().swap(message_);  // a refused message keeps no memory
    return i;
}

void data_reader::finish() {
    if (pending_cr_) refuse("554 5.6.0 Message refused: a bare CR is not a line ending (SMTP smuggling shape)");
    else if (line_len_ > 0) refuse("554 5.6.0 Message refused: the last line has no CRLF");
    if (!refusal_.empty()) std::string().swap(message_);
    done_ = true;
}

namespace {
/// Positions of the dots that start a line.
std::vector<std::size_t> leading_dots(std::string_view m) {
    std::vector<std::size_t> at;
    std::size_t i = 0;
    while (i < m.size()) {
        if (m[i] == '.') at.push_back(i);
        auto nl = m.find('\n', i);
        if (nl == std::string_view::npos) break;
        i = nl + 1;
    }
    return at;
}
}  // namespace

void dot_stuff_in_place(std::string& message) {
    auto at = leading_dots(message);
    if (at.empty()) return;
    std::string out;
    out.reserve(message.size() + at.size());
    std::size_t from = 0;
    for (auto i : at) {
        out.append(message, from, i - from);
        out.push_back('.');
        from = i;
    }
    out.append(message, from, std::string::npos);
    message.swap(out);
}

void dot_unstuff_in_place(std::string& stuffed) {
    auto at = leading_dots(stuffed);
    if (at.empty()) return;
    std::size_t to = at[0];
    for (std::size_t k = 0; k < at.size(); ++k) {
        std::size_t from = at[k] + 1, end = k + 1 < at.size() ? at[k + 1] : stuffed.size();
        std::copy(stuffed.begin() + static_cast<std::ptrdiff_t>(from), stuffed.begin() + static_cast<std::ptrdiff_t>(end),
                  stuffed.begin() + static_cast<std::ptrdiff_t>(to));  // leftwards: no overlap hazard
        to += end - from;
    }
    stuffed.resize(to);
}

int parse_proxy_v2(std::string_view in, proxy_header& out, std::string& error) {
    out = proxy_header{};
    auto n = std::min<std::size_t>(in.size(), 12);
    // memcmp must not see the null pointer of an empty view, even for 0 bytes.
    if (n > 0 && std::memcmp(in.data(), v2_signature, n) != 0) {
        error = "not a PROXY protocol v2 header";
        return -1;
    }
    if (in.size() < 16) return 0;
    auto ver_cmd = static_cast<unsigned char>(in[12]);
    auto fam = static_cast<unsigned char>(in[13]);
    std::size_t len = (static_cast<unsigned char>(in[14]) << 8) | static_cast<unsigned char>(in[15]);
    if ((ver_cmd >> 4) != 2) {
        error = "PROXY protocol version is not 2";
        return -1;
    }
    if (len > 512) {
        error = "PROXY header too long";
        return -1;
    }
    if (in.size() < 16 + len) return 0;
    out.size = 16 + len;
    auto cmd = ver_cmd & 0x0f;
    if (cmd == 0) {
        out.local = true;
        return 1;
    }
    if (cmd != 1) {
        error = "unknown PROXY command";
        return -1;
    }
    const char* a = in.data() + 16;
    char buf[INET6_ADDRSTRLEN];
    if (fam == 0x11) {  // TCP over IPv4
        if (len < 12) {
            error = "short PROXY IPv4 block";
            return -1;
        }
        inet_ntop(AF_INET, a, buf, sizeof buf);
        out.source = buf;
        inet_ntop(AF_INET, a + 4, buf, sizeof buf);
        out.destination = buf;
        out.source_port = static_cast<std::uint16_t>((static_cast<unsigned char>(a[8]) << 8) | static_cast<unsigned char>(a[9]));
        out.destination_port = static_cast<std::uint16_t>((static_cast<unsigned char>(a[10]) << 8) | static_cast<unsigned char>(a[11]));
        return 1;
    }
    if (fam == 0x21) {  // TCP over IPv6
        if (len < 36) {
            error = "short PROXY IPv6 block";
            return -1;
        }
        inet_ntop(AF_INET6, a, buf, sizeof buf);
        out.source = buf;
        inet_ntop(AF_INET6, a + 16, buf, sizeof buf);
        out.destination = buf;
        out.source_port = static_cast<std::uint16_t>((static_cast<unsigned char>(a[32]) << 8) | static_cast<unsigned char>(a[33]));
        out.destination_port = static_cast<std::uint16_t>((static_cast<unsigned char>(a[34]) << 8) | static_cast<unsigned char>(a[35]));
        return 1;
    }
    error = "unsupported PROXY address family";
    return -1;
}

std::string make_proxy_v2(const std::string& src, std::uint16_t src_port, const std::string& dst, std::uint16_t dst_port) {
    std::string out(reinterpret_cast<const char*>(v2_signature), 12);
    unsigned char s4[4], d4[4], s6[16], d6[16];
    bool v4 = inet_pton(AF_INET, src.c_str(), s4) == 1 && inet_pton(AF_INET, dst.c_str(), d4) == 1;
    out.push_back(static_cast<char>(0x21));  // version 2, PROXY
    if (v4) {
        out.push_back(static_cast<char>(0x11));
        out.push_back(0);
        out.push_back(12);
        out.append(reinterpret_cast<char*>(s4), 4);
        out.append(reinterpret_cast<char*>(d4), 4);
    } else {
        if (inet_pton(AF_INET6, src.c_str(), s6) != 1 || inet_pton(AF_INET6, dst.c_str(), d6) != 1) {
            // Mixed families: send LOCAL (no address) rather than a lie.
            out[12] = static_cast<char>(0x20);
            out.push_back(0);
            out.push_back(0);
            out.push_back(0);
            return out;
        }
        out.push_back(static_cast<char>(0x21));
        out.push_back(0);
        out.push_back(36);
        out.append(reinterpret_cast<char*>(s6), 16);
        out.append(reinterpret_cast<char*>(d6), 16);
    }
    out.push_back(static_cast<char>(src_port >> 8));
    out.push_back(static_cast<char>(src_port & 0xff));
    out.push_back(static_cast<char>(dst_port >> 8));
    out.push_back(static_cast<char>(dst_port & 0xff));
    return out;
}

std::string queue_id(const reply& r) {
    auto t = r.text();
    auto p = t.find("queued as ");
    if (p != std::string::npos) {
        auto id = t.substr(p + 10);
        return id.substr(0, id.find_first_of(" \t"));
    }
    auto lt = t.find('<');
    auto gt = t.find('>', lt == std::string::npos ? 0 : lt);
    if (lt != std::string::npos && gt != std::string::npos) return t.substr(lt + 1, gt - lt - 1);
    // "250 2.0.0 OK id=1q2w3e" and similar: the last word.
    auto sp = t.find_last_of(' ');
    return sp == std::string::npos ? "" : t.substr(sp + 1);
}

std::string xtext_encode(std::string_view in) {
    static const char* hex = "0123456789ABCDEF";
    std::string out;
    for (unsigned char c : in) {
        if (c < 33 || c > 126 || c == '+' || c == '=') {
            out += '+';
            out += hex[c >> 4];
            out += hex[c & 15];
        } else {
            out += static_cast<char>(c);
        }
    }
    return out;
}

std::optional<std::string> xtext_decode(std::string_view in) {
    auto nibble = [](char c) -> int {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
    };
    std::string out;
    for (std::size_t i = 0; i < in.size(); ++i) {
        unsigned char c = static_cast<unsigned char>(in[i]);
        if (c == '+') {
            if (i + 2 >= in.size()) return std::nullopt;
            int hi = nibble(in[i + 1]), lo = nibble(in[i + 2]);
            if (hi < 0 || lo < 0) return std::nullopt;
            out += static_cast<char>(hi * 16 + lo);
            i += 2;
        } else if (c < 33 || c > 126 || c == '=') {
            return std::nullopt;
        } else {
            out += static_cast<char>(c);
        }
    }
    return out;
}

std::optional<plain_credentials> parse_sasl_plain(std::string_view d) {
    auto a = d.find('\0');
    if (a == std::string_view::npos) return std::nullopt;
    auto b = d.find('\0', a + 1);
    if (b == std::string_view::npos || d.find('\0', b + 1) != std::string_view::npos) return std::nullopt;
    plain_credentials c{std::string(d.substr(a + 1, b - a - 1)), std::string(d.substr(b + 1))};
    auto authzid = d.substr(0, a);
    if (c.user.empty() || (!authzid.empty() && authzid != c.user)) return std::nullopt;
    return c;
}

}  // namespace dmz::smtp
