// Fuzz target: the SMTP message reader (dmz::smtp::data_reader) in DATA mode (end-of-data
// detection, dot-stuffing kept, the smuggling shapes refused) and in BDAT mode (raw), and
// dot_stuff_in_place / dot_unstuff_in_place. Checks:
// - DATA: it consumes no more than it is given, and all of it unless the end came; the
//   end is a "." line after a CRLF; an accepted message plus ".\r\n" is exactly the bytes
//   consumed, has CRLF line ends only, lines within 1000 octets (a stuffed dot not
//   counted) and size() == its length within the limit; a refusal is a 5xx reply and the
//   message is dropped; the result is the same fed at once, a byte at a time, or in pieces;
// - BDAT: an accepted message is exactly the bytes, whatever the pieces;
// - a message taken by BDAT goes on by DATA with the same meaning: stuffed plus ".\r\n",
//   the DATA reader takes it whole and unstuffing gives the BDAT bytes back; and a
//   message taken by DATA, unstuffed, is taken by BDAT;
// - dot_unstuff(dot_stuff(x)) == x for any bytes.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "check.hpp"
#include "dmz/proxy/smtp/parser.hpp"

namespace {

using namespace dmz::smtp;
using dmz::fuzz::lcg;

struct outcome {
    std::size_t used = 0;
    bool done = false;
    std::string refusal, message;
    std::uint64_t size = 0;
    bool operator==(const outcome&) const = default;
};

/// Feeds `in` as a session does: what is buffered, then more as it arrives.
template <class Piece>
outcome read(std::string_view in, std::uint64_t max_size, bool raw, Piece&& piece) {
    data_reader r(max_size, raw);
    outcome o;
    std::size_t arrived = 0;
    // Each round lets at least one more byte arrive.
    for (std::size_t rounds = 0; rounds <= in.size() && arrived < in.size() && !r.done(); ++rounds) {
        arrived += std::min(in.size() - arrived, piece());
        auto avail = in.substr(o.used, arrived - o.used);
        auto n = r.feed(avail);
        DMZ_FUZZ_CHECK(n <= avail.size());
        if (!r.done()) DMZ_FUZZ_CHECK(n == avail.size());
        if (raw) DMZ_FUZZ_CHECK(!r.done() && n == avail.size());
        o.used += n;
    }
    if (raw) r.finish();
    o.done = r.done();
    o.refusal = r.refusal();
    o.message = r.message();
    o.size = r.size();
    return o;
}

bool crlf_lines_only(std::string_view m) {
    for (std::size_t i = 0; i < m.size(); ++i) {
        if (m[i] == '\n' && (i == 0 || m[i - 1] != '\r')) return false;
        if (m[i] == '\r' && (i + 1 == m.size() || m[i + 1] != '\n')) return false;
    }
    return m.empty() || m.ends_with("\r\n");
}

bool lines_fit(std::string_view m, bool stuffed) {
    while (!m.empty()) {
        auto end = m.find("\r\n");
        if (end == std::string_view::npos) return false;
        std::size_t len = end + 2 - (stuffed && m[0] == '.' ? 1 : 0);
        if (len > max_text_line) return false;
        m.remove_prefix(end + 2);
    }
    return true;
}

void check_refusal(const outcome& o) {
    DMZ_FUZZ_CHECK(o.refusal.size() > 4 && o.refusal[0] == '5' && o.refusal[3] == ' ');
    DMZ_FUZZ_CHECK(o.message.empty());
}

outcome data_mode(std::string_view in, std::uint64_t max_size) {
    auto whole = read(in, max_size, false, [&] { return in.size(); });
    DMZ_FUZZ_CHECK(whole.used <= in.size());
    if (!whole.done) DMZ_FUZZ_CHECK(whole.used == in.size());
    if (whole.done) {
        auto taken = in.substr(0, whole.used);
        DMZ_FUZZ_CHECK(taken == ".\r\n" || taken.ends_with("\r\n.\r\n"));
    }
    if (!whole.refusal.empty()) {
        check_refusal(whole);
    } else {
        DMZ_FUZZ_CHECK(whole.size == whole.message.size() && whole.size <= max_size);
        DMZ_FUZZ_CHECK(crlf_lines_only(whole.message) && lines_fit(whole.message, true));
        if (whole.done) DMZ_FUZZ_CHECK(whole.message + ".\r\n" == in.substr(0, whole.used));
        else DMZ_FUZZ_CHECK(std::string_view(whole.message) == in.substr(0, whole.message.size()));
    }
    DMZ_FUZZ_CHECK(read(in, max_size, false, [] { return std::size_t{1}; }) == whole);
    lcg rng(in);
    DMZ_FUZZ_CHECK(read(in, max_size, false, [&] { return 1 + rng.below(64); }) == whole);
    return whole;
}

outcome raw_mode(std::string_view in, std::uint64_t max_size) {
    auto whole = read(in, max_size, true, [&] { return in.size(); });
    DMZ_FUZZ_CHECK(whole.done && whole.used == in.size());
    if (!whole.refusal.empty()) {
        check_refusal(whole);
    } else {
        DMZ_FUZZ_CHECK(whole.message == in && whole.size == in.size() && whole.size <= max_size);
        DMZ_FUZZ_CHECK(crlf_lines_only(whole.message) && lines_fit(whole.message, false));
    }
    lcg rng(in);
    DMZ_FUZZ_CHECK(read(in, max_size, true, [&] { return 1 + rng.below(64); }) == whole);
    DMZ_FUZZ_CHECK(read(in, max_size, true, [] { return std::size_t{1}; }) == whole);
    return whole;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::string_view in(reinterpret_cast<const char*>(data), size);
    constexpr std::uint64_t big = 1 << 24;  // more than any input, with stuffing
    auto d = data_mode(in, big);
    data_mode(in, 64);  // the size limit, reached by short inputs
    auto b = raw_mode(in, big);
    raw_mode(in, 64);

    if (b.refusal.empty()) {
        // BDAT -> DATA: stuffed, ended, read back, unstuffed.
        std::string stuffed = b.message;
        dot_stuff_in_place(stuffed);
        auto via_data = read(stuffed + ".\r\n", big, false, [] { return std::size_t{1} << 30; });
        DMZ_FUZZ_CHECK(via_data.done && via_data.refusal.empty() && via_data.used == stuffed.size() + 3);
        DMZ_FUZZ_CHECK(via_data.message == stuffed);
        dot_unstuff_in_place(via_data.message);
        DMZ_FUZZ_CHECK(via_data.message == b.message);
    }
    if (d.done && d.refusal.empty()) {
        // DATA -> BDAT: unstuffed, taken as one chunk.
        std::string plain = d.message;
        dot_unstuff_in_place(plain);
        auto via_bdat = read(plain, big, true, [&] { return plain.size(); });
        DMZ_FUZZ_CHECK(via_bdat.refusal.empty() && via_bdat.message == plain);
    }

    std::string x(in);
    dot_stuff_in_place(x);
    DMZ_FUZZ_CHECK(x.size() >= in.size());
    dot_unstuff_in_place(x);
    DMZ_FUZZ_CHECK(x == in);
    return 0;
}
