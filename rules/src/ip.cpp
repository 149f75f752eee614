#include "dmz/rules/ip.hpp"

#include <arpa/inet.h>

#include <charconv>
#include <cstring>

namespace dmz::rules {

namespace {
constexpr std::array<std::uint8_t, 12> v4_mapped_prefix{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

bool prefix_equal(const std::array<std::uint8_t, 16>& a, const std::array<std::uint8_t, 16>& b,
                  int bits) {
    int full = bits / 8;
    if (std::memcmp(a.data(), b.data(), static_cast<std::size_t>(full)) != 0) return false;
    int rest = bits % 8;
    if (rest == 0) return true;
    auto mask = static_cast<std::uint8_t>(0xff << (8 - rest));
    return (a[full] & mask) == (b[full] & mask);
}
}  // namespace

std::optional<ip_address> ip_address::parse(std::string_view text) {
    if (text.size() >= 2 && text.front() == '[' && text.back() == ']')
        text = text.substr(1, text.size() - 2);
    if (text.empty() || text.size() > 45) return std::nullopt;
    char buf[46];
    std::memcpy(buf, text.data(), text.size());
    buf[text.size()] = '\0';
    ip_address out;
    in_addr v4{};
    if (text.find(':') == std::string_view::npos) {
        if (inet_pton(AF_INET, buf, &v4) != 1) return std::nullopt;
        std::memcpy(out.bytes_.data(), v4_mapped_prefix.data(), 12);
        std::memcpy(out.bytes_.data() + 12, &v4, 4);
        return out;
    }
    in6_addr v6{};
    if (inet_pton(AF_INET6, buf, &v6) != 1) return std::nullopt;
    std::memcpy(out.bytes_.data(), &v6, 16);
    return out;
}

ip_address ip_address::from_v4(std::uint32_t host_order) {
    ip_address out;
    std::memcpy(out.bytes_.data(), v4_mapped_prefix.data(), 12);
    out.bytes_[12] = static_cast<std::uint8_t>(host_order >> 24);
    out.bytes_[13] = static_cast<std::uint8_t>(host_order >> 16);
    out.bytes_[14] = static_cast<std::uint8_t>(host_order >> 8);
    out.bytes_[15] = static_cast<std::uint8_t>(host_order);
    return out;
}

ip_address ip_address::from_bytes(const std::array<std::uint8_t, 16>& bytes) {
    ip_address out;
    out.bytes_ = bytes;
    return out;
}

bool ip_address::is_v4() const {
    return std::memcmp(bytes_.data(), v4_mapped_prefix.data(), 12) == 0;
}

bool ip_address::is_unspecified() const {
    if (is_v4()) return bytes_[12] == 0 && bytes_[13] == 0 && bytes_[14] == 0 && bytes_[15] == 0;
    for (auto b : bytes_)
        if (b != 0) return false;
    return true;
}

bool ip_address::is_loopback() const {
    if (is_v4()) return bytes_[12] == 127;
    for (int i = 0; i < 15; ++i)
        if (bytes_[i] != 0) return false;
    return bytes_[15] == 1;
}

std::string ip_address::to_string() const {
    char buf[INET6_ADDRSTRLEN] = {};
    if (is_v4()) {
        inet_ntop(AF_INET, bytes_.data() + 12, buf, sizeof buf);
    } else {
        inet_ntop(AF_INET6, bytes_.data(), buf, sizeof buf);
    }
    return buf;
}

cidr::cidr(ip_address base, int prefix_in_128) : base_(base), prefix_(prefix_in_128) {}

std::optional<cidr> cidr::parse(std::string_view text, std::string* error) {
    auto fail = [&](std::string why) -> std::optional<cidr> {
        if (error) *error = std::move(why);
        return std::nullopt;
    };
    auto slash = text.find('/');
    auto addr_text = text.substr(0, slash);
    auto addr = ip_address::parse(addr_text);
    if (!addr) return fail("'" + std::string(addr_text) + "' is not an IPv4 or IPv6 address");
    int family_bits = addr->is_v4() && addr_text.find(':') == std::string_view::npos ? 32 : 128;
    int prefix = family_bits;
    if (slash != std::string_view::npos) {
        auto p = text.substr(slash + 1);
        auto [ptr, ec] = std::from_chars(p.data(), p.data() + p.size(), prefix);
        if (p.empty() || ec != std::errc{} || ptr != p.data() + p.size() || prefix < 0 ||
            prefix > family_bits)
            return fail("prefix length '" + std::string(p) + "' must be 0.." +
                        std::to_string(family_bits));
    }
    int prefix128 = family_bits == 32 ? prefix + 96 : prefix;
    cidr out(*addr, prefix128);
    // Host bits set usually means a typo ("10.0.0.1/8"); say what was probably meant.
    ip_address masked = *addr;
    auto bytes = masked.bytes();
    for (int bit = prefix128; bit < 128; ++bit)
        bytes[bit / 8] &= static_cast<std::uint8_t>(~(0x80 >> (bit % 8)));
    if (bytes != addr->bytes()) {
        return fail("'" + std::string(text) + "' has host bits set; did you mean '" +
                    ip_address::from_bytes(bytes).to_string() + "/" + std::to_string(prefix) + "'?");
    }
    return out;
}

bool cidr::contains(const ip_address& a) const {
    return prefix_equal(base_.bytes(), a.bytes(), prefix_);
}

bool cidr::contains(const cidr& other) const {
    return other.prefix_ >= prefix_ && contains(other.base_);
}

bool cidr::overlaps(const cidr& other) const { return contains(other) || other.contains(*this); }

std::string cidr::to_string() const {
    return base_.to_string() + "/" + std::to_string(prefix());
}

}  // namespace dmz::rules
