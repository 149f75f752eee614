#pragma once
/// @file IPv4/IPv6 addresses and CIDR ranges. IPv4 is held as IPv4-mapped IPv6
/// (::ffff:a.b.c.d) so that a dual-stack socket's peer and a v4 range compare directly.
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace dmz::rules {

class ip_address {
public:
    ip_address() = default;
    /// Parses dotted IPv4 or textual IPv6 (with or without brackets). No zone ids.
    static std::optional<ip_address> parse(std::string_view text);
    static ip_address from_v4(std::uint32_t host_order);
    static ip_address from_bytes(const std::array<std::uint8_t, 16>& bytes);

    bool is_v4() const;  ///< true for IPv4 and IPv4-mapped IPv6
    bool is_loopback() const;  ///< 127.0.0.0/8 or ::1
    bool is_unspecified() const;  ///< 0.0.0.0 or ::
    const std::array<std::uint8_t, 16>& bytes() const { return bytes_; }
    std::string to_string() const;
    auto operator<=>(const ip_address&) const = default;

private:
    std::array<std::uint8_t, 16> bytes_{};
};

class cidr {
public:
    cidr() = default;
    cidr(ip_address base, int prefix_in_128);
    /// "10.0.0.0/8", "fd00::/8", or a bare address (a /32 or /128).
    /// On failure returns nullopt and sets *error to a one-line reason with a hint.
    static std::optional<cidr> parse(std::string_view text, std::string* error = nullptr);

    bool contains(const ip_address& a) const;
    bool contains(const cidr& other) const;
    bool overlaps(const cidr& other) const;
    const ip_address& base() const { return base_; }
    /// Prefix length in the family's own terms (0..32 for IPv4, 0..128 for IPv6).
    int prefix() const { return base_.is_v4() && prefix_ >= 96 ? prefix_ - 96 : prefix_; }
    int prefix128() const { return prefix_; }
    /// log2 of the number of addresses the range holds.
    int host_bits() const { return 128 - prefix_; }
    std::string to_string() const;
    auto operator<=>(const cidr&) const = default;

private:
    ip_address base_;
    int prefix_ = 128;
};

}  // namespace dmz::rules
