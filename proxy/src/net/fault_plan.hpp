#pragma once
// Fault injection for the session tests (Beast's test::stream fail_count, on real sockets):
// a worker may carry a plan that makes the n-th operation of one kind fail. Production
// workers carry none; a stream then pays one predictable branch per operation.
#include <array>
#include <cstdint>

namespace dmz::net {

/// The operations a plan counts: reads (read_some, wait_readable, splice fill), writes
/// (write, splice drain), upstream connects and TLS handshakes (either side).
enum class op_kind : std::uint8_t { read, write, connect, handshake };
inline constexpr std::size_t op_kinds = 4;
const char* to_string(op_kind k);

/// Counts the operations of the streams that share it (a session's client stream and its
/// upstream streams) and fails the `fail_at`-th one of kind `kind` (1-based; 0 never):
/// its socket is shut down both ways, as a connection that broke at that moment, and the
/// operation completes (posted, never inline) with the error the kind's failure has.
struct fault_plan {
    op_kind kind = op_kind::read;
    unsigned fail_at = 0;
    std::array<unsigned, op_kinds> seen{};  ///< operations so far, by kind
    bool fired = false;
    /// Read errors are resets by default; `eof` makes them an orderly close instead.
    bool eof = false;

    /// Counts one operation; true when it is the one to fail.
    bool due(op_kind k) {
        auto i = static_cast<std::size_t>(k);
        if (++seen[i] != fail_at || k != kind || fired) return false;
        fired = true;
        return true;
    }
};

}  // namespace dmz::net
