// Fuzz target: the SMTP command reader: CRLF line framing (dmz::smtp::next_line) at the
// command limit (512) and at the AUTH continuation limit (12288), each line parsed as a
// command (parse_command); the same bytes read as upstream replies (parse_reply); and
// the xtext and SASL PLAIN decoders that AUTH and MAIL parameters go through. Checks:
// - a line is what precedes the first CRLF, holds no CR or LF, and fits the limit with
//   its CRLF; too_long only when it cannot fit; need_more only when it still could, and
//   then the missing line end makes it a line (two pieces);
// - a command has an upper-case alphabetic verb of at most 16 letters, its argument is the
//   rest of the line; a refusal is a 500/501 reply line;
// - a reply consumes no more than it has, has one code and 1..101 lines, and goes back on
//   the wire as the same bytes (or, for a bare "250", a canonical "250 "); every proper
//   prefix of it is need_more; a refused prefix means a refused whole;
// - xtext_decode(xtext_encode(x)) == x.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "check.hpp"
#include "dmz/proxy/smtp/parser.hpp"

namespace {

using namespace dmz::smtp;

void check_command(std::string_view line) {
    command c;
    std::string err;
    if (!parse_command(line, c, err)) {
        DMZ_FUZZ_CHECK(err.starts_with("500 ") || err.starts_with("501 "));
        return;
    }
    DMZ_FUZZ_CHECK(!c.verb.empty() && c.verb.size() <= 16);
    for (char ch : c.verb) DMZ_FUZZ_CHECK(ch >= 'A' && ch <= 'Z');
    auto sp = line.find(' ');
    DMZ_FUZZ_CHECK(c.argument == (sp == std::string_view::npos ? std::string_view{} : line.substr(sp + 1)));
    if (c.verb == "MAIL" || c.verb == "RCPT") {
        DMZ_FUZZ_CHECK(line.find("<" + c.path + ">") != std::string_view::npos);
        for (auto& [k, v] : c.params) {
            DMZ_FUZZ_CHECK(!k.empty());
            for (char ch : k) DMZ_FUZZ_CHECK((ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '-');
            DMZ_FUZZ_CHECK(v.find(' ') == std::string::npos);
        }
    } else {
        DMZ_FUZZ_CHECK(c.path.empty() && c.params.empty());
    }
}

void lines(std::string_view in, std::size_t max_len, bool parse) {
    // Each round consumes at least 3 bytes or stops.
    for (std::size_t rounds = 0; rounds <= in.size(); ++rounds) {
        std::string_view line;
        std::size_t used = 0;
        auto r = next_line(in, max_len, line, used);
        auto stop = in.find_first_of("\r\n");
        std::size_t first_end = stop == std::string_view::npos ? in.size() : stop;
        switch (r) {
        case line_result::line:
            DMZ_FUZZ_CHECK(used == line.size() + 2 && used <= in.size() && used <= max_len);
            DMZ_FUZZ_CHECK(line.data() == in.data() && line.size() == first_end);
            DMZ_FUZZ_CHECK(in.substr(line.size(), 2) == "\r\n");
            if (parse) check_command(line);
            in.remove_prefix(used);
            continue;
        case line_result::too_long:
            DMZ_FUZZ_CHECK(first_end > max_len - 2);
            return;
        case line_result::need_more: {
            DMZ_FUZZ_CHECK(first_end + 2 <= max_len);
            DMZ_FUZZ_CHECK(stop == std::string_view::npos || (in[stop] == '\r' && stop + 1 == in.size()));
            // The second piece: the line end that was missing.
            std::string whole(in);
            whole += whole.ends_with('\r') ? "\n" : "\r\n";
            std::string_view l2;
            std::size_t u2 = 0;
            DMZ_FUZZ_CHECK(next_line(whole, max_len, l2, u2) == line_result::line && u2 == whole.size());
            return;
        }
        case line_result::bare_lf:
            DMZ_FUZZ_CHECK(in[first_end] == '\n' && first_end + 2 <= max_len);
            return;
        case line_result::bare_cr:
            DMZ_FUZZ_CHECK(in[first_end] == '\r' && first_end + 1 < in.size() && in[first_end + 1] != '\n');
            return;
        }
    }
}

/// The last line of a reply, without its CRLF.
std::string_view last_line(std::string_view reply_bytes) {
    reply_bytes.remove_suffix(2);
    auto p = reply_bytes.rfind("\r\n");
    return p == std::string_view::npos ? reply_bytes : reply_bytes.substr(p + 2);
}

void replies(std::string_view in) {
    dmz::fuzz::lcg rng(in);
    for (std::size_t rounds = 0; rounds <= in.size(); ++rounds) {
        reply r;
        std::size_t used = 0;
        int v = parse_reply(in, r, used);
        {
            auto k = rng.below(in.size() + 1);
            reply rp;
            std::size_t up = 0;
            if (parse_reply(in.substr(0, k), rp, up) == -1) DMZ_FUZZ_CHECK(v == -1);
        }
        if (v != 1) {
            DMZ_FUZZ_CHECK(v == 0 || v == -1);
            return;
        }
        DMZ_FUZZ_CHECK(used >= 5 && used <= in.size());
        DMZ_FUZZ_CHECK(r.code >= 200 && r.code <= 559);
        DMZ_FUZZ_CHECK(!r.lines.empty() && r.lines.size() <= 101);
        auto wire = r.wire();
        auto original = in.substr(0, used);
        bool bare_last = last_line(original).size() == 3;
        if (bare_last) DMZ_FUZZ_CHECK(wire.size() == used + 1);
        else DMZ_FUZZ_CHECK(wire == original);
        reply again;
        std::size_t used2 = 0;
        DMZ_FUZZ_CHECK(parse_reply(wire, again, used2) == 1 && used2 == wire.size());
        DMZ_FUZZ_CHECK(again.code == r.code && again.lines == r.lines);
        for (std::size_t k : {used - 1, rng.below(used)}) {
            reply rp;
            std::size_t up = 0;
            DMZ_FUZZ_CHECK(parse_reply(in.substr(0, k), rp, up) == 0);
        }
        (void)queue_id(r);
        in.remove_prefix(used);
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::string_view in(reinterpret_cast<const char*>(data), size);
    lines(in, max_command_line, true);
    lines(in, 12288, false);
    replies(in);

    auto encoded = xtext_encode(in);
    auto decoded = xtext_decode(encoded);
    DMZ_FUZZ_CHECK(decoded && *decoded == in);
    for (char c : encoded) DMZ_FUZZ_CHECK(c >= 33 && c <= 126 && c != '=');
    if (auto x = xtext_decode(in)) DMZ_FUZZ_CHECK(x->size() <= in.size());

    if (auto creds = parse_sasl_plain(in)) {
        DMZ_FUZZ_CHECK(!creds->user.empty());
        DMZ_FUZZ_CHECK(creds->user.find('\0') == std::string::npos && creds->password.find('\0') == std::string::npos);
    }
    return 0;
}
