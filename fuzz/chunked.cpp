// Fuzz target: the chunked transfer-coding decoder (dmz::http::chunked_decoder), which
// frames request bodies (ActiveSync, EWS) and MAPI's chunked responses. Two runs per input:
// 1. The input as wire bytes, decoded as a session does (feed what is buffered, drop what
//    was consumed, read more), once with everything at once, once a byte at a time and once
//    in pieces the input chooses: the payload, the end, the error and where it stopped are
//    the same; every step consumes no more than it was given, its payload lies inside what
//    it consumed, and a step on non-empty input that neither ends nor fails makes progress
//    (else the session's loop would spin).
// 2. The input as payload, chunked here with sizes, extensions and trailers the input
//    chooses: it decodes back to exactly the payload and stops right after the last chunk.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "check.hpp"
#include "dmz/proxy/http/parser.hpp"

namespace {

using namespace dmz::http;
using dmz::fuzz::lcg;
using dmz::fuzz::within;

struct outcome {
    bool ok = true;
    bool done = false;
    std::string payload;
    std::size_t used = 0;  ///< input bytes consumed when it stopped
    std::string code;
    bool operator==(const outcome&) const = default;
};

/// Decodes `in`, which arrives in pieces whose sizes `piece` returns (at least 1).
template <class Piece>
outcome decode(std::string_view in, Piece&& piece) {
    chunked_decoder dec;
    outcome o;
    std::size_t arrived = 0;
    // Each round consumes a byte or lets one more arrive: 2 * size + 2 rounds at most.
    for (std::size_t rounds = 0; rounds <= 2 * in.size() + 2; ++rounds) {
        if (o.used == arrived) {
            if (arrived == in.size()) return o;
            arrived += std::min(in.size() - arrived, piece());
        }
        auto avail = in.substr(o.used, arrived - o.used);
        chunked_decoder::step st;
        parse_error err;
        bool ok = dec.feed(avail, st, err);
        DMZ_FUZZ_CHECK(st.consumed <= avail.size());
        DMZ_FUZZ_CHECK(within(st.data, avail.substr(0, st.consumed)));
        o.used += st.consumed;
        if (!ok) {
            DMZ_FUZZ_CHECK(!err.code.empty() && err.status == 400);
            o.ok = false;
            o.code = err.code;
            return o;
        }
        o.payload.append(st.data);
        if (st.done) {
            DMZ_FUZZ_CHECK(dec.done() && st.data.empty());
            o.done = true;
            return o;
        }
        DMZ_FUZZ_CHECK(!dec.done());
        DMZ_FUZZ_CHECK(st.consumed > 0);  // non-empty input, not done, no error: progress
    }
    DMZ_FUZZ_CHECK(false && "the decode loop did not end");
    return o;
}

void wire_bytes(std::string_view in) {
    auto whole = decode(in, [&] { return in.size(); });
    auto bytewise = decode(in, [] { return std::size_t{1}; });
    lcg rng(in);
    auto pieces = decode(in, [&] { return 1 + rng.below(16); });
    DMZ_FUZZ_CHECK(whole == bytewise);
    DMZ_FUZZ_CHECK(whole == pieces);
    DMZ_FUZZ_CHECK(whole.used <= in.size());
    DMZ_FUZZ_CHECK(whole.payload.size() <= whole.used);
    if (whole.ok && !whole.done) DMZ_FUZZ_CHECK(whole.used == in.size());
}

std::string hex(std::size_t n) {
    static constexpr char digits[] = "0123456789abcdef";
    std::string s;
    do {
        s.insert(s.begin(), digits[n & 15]);
        n >>= 4;
    } while (n);
    return s;
}

void round_trip(std::string_view payload) {
    lcg rng(payload);
    std::string wire;
    std::size_t at = 0;
    // Each round takes at least one payload byte.
    while (at < payload.size()) {
        std::size_t n = 1 + rng.below(std::min<std::size_t>(payload.size() - at, 300));
        wire += rng.below(4) == 0 ? "00" + hex(n) : hex(n);  // leading zeros are allowed
        if (rng.below(4) == 0) wire += ";ext=\"v\"";
        wire += "\r\n";
        wire.append(payload.substr(at, n));
        wire += "\r\n";
        at += n;
    }
    wire += "0";
    if (rng.below(3) == 0) wire += ";last";
    wire += "\r\n";
    if (rng.below(3) == 0) wire += "X-Trailer: done\r\n";
    wire += "\r\n";
    std::size_t end = wire.size();
    wire += "GET / HTTP/1.1\r\n";  // the next request on the connection is not consumed

    std::string_view w(wire);
    auto whole = decode(w, [&] { return w.size(); });
    DMZ_FUZZ_CHECK(whole.ok && whole.done);
    DMZ_FUZZ_CHECK(whole.used == end);
    DMZ_FUZZ_CHECK(whole.payload == payload);
    lcg split(payload);
    auto pieces = decode(w, [&] { return 1 + split.below(7); });
    DMZ_FUZZ_CHECK(pieces == whole);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::string_view in(reinterpret_cast<const char*>(data), size);
    wire_bytes(in);
    round_trip(in);
    return 0;
}
