// Fuzz target: the PROXY protocol v2 header parser (dmz::smtp::parse_proxy_v2), which reads
// the first bytes a back-end gets from the front-end tier, and make_proxy_v2, which writes
// them. Checks:
// - done: the header is 16 + the length it declares, within the input, and parses the
//   same alone; every proper prefix of it is need_more; LOCAL has no addresses, PROXY has
//   both; an address block written again by make_proxy_v2 parses back to the same;
// - need_more: the bytes so far agree with the signature and the header is not complete;
// - a refused prefix means a refused whole; an error says why;
// - make_proxy_v2 of any two strings and ports gives a header that parses, whole, to those
//   addresses when both are of one family, else to LOCAL.
#include <arpa/inet.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "check.hpp"
#include "dmz/proxy/smtp/parser.hpp"

namespace {

using namespace dmz::smtp;

constexpr unsigned char signature[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

bool same(const proxy_header& a, const proxy_header& b) {
    return a.local == b.local && a.source == b.source && a.source_port == b.source_port &&
           a.destination == b.destination && a.destination_port == b.destination_port && a.size == b.size;
}

/// The textual form inet_ntop gives, or "" when `s` is not an address of that family.
std::string canonical(int family, const std::string& s) {
    unsigned char buf[16];
    char text[INET6_ADDRSTRLEN];
    if (inet_pton(family, s.c_str(), buf) != 1) return {};
    return inet_ntop(family, buf, text, sizeof text) ? text : "";
}

void parsed(std::string_view in) {
    proxy_header h;
    std::string err;
    int r = parse_proxy_v2(in, h, err);
    DMZ_FUZZ_CHECK(r == 1 || r == 0 || r == -1);
    if (r == -1) DMZ_FUZZ_CHECK(!err.empty());
    if (r == 0) {
        auto n = std::min<std::size_t>(in.size(), 12);
        DMZ_FUZZ_CHECK(n == 0 || std::memcmp(in.data(), signature, n) == 0);
        DMZ_FUZZ_CHECK(in.size() < 16 || in.size() < 16u + ((static_cast<unsigned char>(in[14]) << 8) |
                                                           static_cast<unsigned char>(in[15])));
    }
    dmz::fuzz::lcg rng(in);
    {
        auto k = rng.below(in.size() + 1);
        proxy_header hp;
        std::string ep;
        if (parse_proxy_v2(in.substr(0, k), hp, ep) == -1) DMZ_FUZZ_CHECK(r == -1);
    }
    if (r != 1) return;

    DMZ_FUZZ_CHECK(in.size() >= 16);
    std::size_t declared = (static_cast<unsigned char>(in[14]) << 8) | static_cast<unsigned char>(in[15]);
    DMZ_FUZZ_CHECK(h.size == 16 + declared && h.size <= in.size());
    if (h.local) {
        DMZ_FUZZ_CHECK(h.source.empty() && h.destination.empty() && h.source_port == 0 && h.destination_port == 0);
    } else {
        DMZ_FUZZ_CHECK(!h.source.empty() && !h.destination.empty());
    }
    proxy_header alone;
    DMZ_FUZZ_CHECK(parse_proxy_v2(in.substr(0, h.size), alone, err) == 1 && same(alone, h));
    for (std::size_t k : {h.size - 1, rng.below(h.size)}) {
        proxy_header hp;
        DMZ_FUZZ_CHECK(parse_proxy_v2(in.substr(0, k), hp, err) == 0);
    }
    if (!h.local) {
        auto again = make_proxy_v2(h.source, h.source_port, h.destination, h.destination_port);
        proxy_header back;
        DMZ_FUZZ_CHECK(parse_proxy_v2(again, back, err) == 1 && back.size == again.size());
        DMZ_FUZZ_CHECK(!back.local && back.source == h.source && back.destination == h.destination);
        DMZ_FUZZ_CHECK(back.source_port == h.source_port && back.destination_port == h.destination_port);
    }
}

void made(std::string_view in) {
    if (in.size() < 4) return;
    auto sport = static_cast<std::uint16_t>((static_cast<unsigned char>(in[0]) << 8) | static_cast<unsigned char>(in[1]));
    auto dport = static_cast<std::uint16_t>((static_cast<unsigned char>(in[2]) << 8) | static_cast<unsigned char>(in[3]));
    auto rest = in.substr(4);
    auto sp = rest.find(' ');
    std::string src(rest.substr(0, sp)), dst(sp == std::string_view::npos ? std::string_view{} : rest.substr(sp + 1));
    // inet_pton reads C strings: an embedded NUL ends the address there, so leave such out.
    if (src.find('\0') != std::string::npos || dst.find('\0') != std::string::npos) return;
    auto wire = make_proxy_v2(src, sport, dst, dport);
    proxy_header h;
    std::string err;
    DMZ_FUZZ_CHECK(parse_proxy_v2(wire, h, err) == 1 && h.size == wire.size());
    auto s4 = canonical(AF_INET, src), d4 = canonical(AF_INET, dst);
    auto s6 = canonical(AF_INET6, src), d6 = canonical(AF_INET6, dst);
    if (!s4.empty() && !d4.empty()) {
        DMZ_FUZZ_CHECK(!h.local && h.source == s4 && h.destination == d4);
    } else if (!s6.empty() && !d6.empty()) {
        DMZ_FUZZ_CHECK(!h.local && h.source == s6 && h.destination == d6);
    } else {
        DMZ_FUZZ_CHECK(h.local);
        return;
    }
    DMZ_FUZZ_CHECK(h.source_port == sport && h.destination_port == dport);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::string_view in(reinterpret_cast<const char*>(data), size);
    parsed(in);
    made(in);
    // No bytes at all, as a default-constructed view (no buffer behind it): need more.
    proxy_header h;
    std::string err;
    DMZ_FUZZ_CHECK(parse_proxy_v2(std::string_view{}, h, err) == 0);
    return 0;
}
