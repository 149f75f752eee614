#pragma once
// The one raw byte pipe: octets from one stream to another, as they are, for HTTP identity
// bodies (both ways) and SMTP `tcp` mode. Between two plain sockets a long copy moves
// through a kernel pipe with splice(2) and never enters this process; anything else (TLS on
// either side, or a short copy) goes through the caller's buffer.
#include <cstdint>
#include <functional>

#include "net/asio.hpp"
#include "net/buffer.hpp"

namespace dmz::net {

/// `pipe_leg::left` for a copy that runs until `from` ends (a clean end is success).
inline constexpr std::uint64_t until_eof = ~std::uint64_t{0};

/// One direction of a copy.
struct pipe_leg {
    stream& from;
    stream& to;
    /// Octets already read from `from` (they go first); reads land here too. Emptied and
    /// released when the copy moves to a kernel pipe.
    proxy::flat_buffer& pending;
    /// Octets to move, or `until_eof`.
    std::uint64_t left = until_eof;
    /// Grows by every octet written to `to` (the access log's counters).
    std::uint64_t& moved;
    /// Runs before every wait for `from` (arms its read deadline, starts a client watch).
    std::function<void()> before_read;
    /// Set when the copy stopped because writing to `to` failed (else `from` failed or ended).
    bool to_failed = false;
};

/// A known length shorter than this (beyond what is pending) is copied through the buffer:
/// a kernel pipe costs three system calls to set up.
inline constexpr std::uint64_t splice_min = 256 * 1024;

/// Moves `leg.left` octets (or everything until `from` ends). True when all went (for
/// `until_eof`: when `from` ended cleanly); false with `ec` set otherwise. Bytes are never
/// read from `from` beyond `left`, so what follows a body stays unread.
task<bool> pipe(pipe_leg& leg, error_code& ec);

}  // namespace dmz::net
