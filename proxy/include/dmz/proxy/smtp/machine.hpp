#pragma once
/// @file The SMTP protocol state machine of an `smtp`-mode session, without I/O. The session
/// feeds it parsed commands, message octets and upstream replies; the machine answers with
/// the replies to send (`take_replies`) and a `step` naming the I/O to do next. Rule
/// decisions, credentials and access-log records go through `callbacks`.
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dmz/proxy/smtp/parser.hpp"
#include "dmz/rules/evaluate.hpp"
#include "dmz/rules/fault.hpp"

namespace dmz::smtp {

/// Where the session stands.
enum class state : std::uint8_t {
    command,        ///< waiting for a command line
    skipping_line,  ///< dropping the rest of an over-long command line
    auth_response,  ///< waiting for a line of an AUTH exchange
    auth_check,     ///< the credentials are being checked (off the event loop)
    tls_handshake,  ///< 220 said to STARTTLS; the TLS handshake runs
    data,           ///< reading a DATA message
    bdat_chunk,     ///< reading the octets of a BDAT chunk
    upstream,       ///< waiting for an upstream reply
    closed,         ///< the session ends (replies may still wait to be sent)
};

/// The I/O the session does next.
enum class action : std::uint8_t {
    read_command,    ///< frame the next command line (reading more when needed)
    skip_line,       ///< drop client octets up to the next CRLF, then `on_line_skipped`
    read_auth_line,  ///< one line of up to `max_auth_line` octets: `on_auth_line`
    check_credentials,  ///< check `user`/`password` against the user store: `on_credentials`
    start_tls,       ///< send the replies, drop buffered input, handshake: `on_tls_started`
    read_data,       ///< `feed_data` until `data_complete`, then `on_data_end`
    read_chunk,      ///< exactly `chunk_size` octets to `feed_chunk`, then `on_chunk_end`
    upstream,        ///< write `up` upstream, read one reply: `on_upstream_reply`
    end,             ///< send the replies and end the session
};

/// RFC 4954 4: an AUTH response line may be 12288 octets.
inline constexpr std::size_t max_auth_line = 12288;
/// Client errors (refused commands, over-long lines) before the session is closed.
inline constexpr int max_client_errors = 20;

/// Octets for the upstream: `head`, then `body`, then `tail`, in one write.
struct upstream_write {
    std::string head;
    std::string body;       ///< a message, when `message`
    std::string_view tail;  ///< a literal (".\r\n"), or empty
    bool message = false;   ///< a failed write is "writing the message ... failed"
};

struct step {
    action next = action::read_command;
    upstream_write up;            ///< for action::upstream
    std::uint64_t chunk_size = 0; ///< for action::read_chunk
    std::string user, password;   ///< for action::check_credentials
};

inline step next_io(action a, std::uint64_t chunk_size = 0) {
    step s;
    s.next = a;
    s.chunk_size = chunk_size;
    return s;
}

/// What the upstream offers after EHLO.
struct upstream_capabilities {
    bool eight_bit = false, size = false, xclient_login = false, pipelining = false, chunking = false;
};
upstream_capabilities parse_capabilities(const reply& ehlo);

/// One access-log record: a mail transaction, or a refused AUTH.
struct log_entry {
    std::string user, ehlo;
    bool denied = false;  ///< the log's action: deny (else allow)
    std::string mail_from;
    std::vector<std::string> rcpt_accepted;
    std::vector<std::pair<std::string, std::string>> rcpt_refused;  ///< recipient, reply
    std::uint64_t size = 0;
    int status = 0;
    std::string upstream_reply, queue_id, note;
    rules::fault fault;
    std::chrono::steady_clock::time_point since;  ///< the duration runs from here
};

struct login_result {
    bool ok = false;
    std::string user;
    std::string refusal;  ///< for the log: "bad password", "locked out", ...
    bool overloaded = false;  ///< the checks are saturated: 454, try later (RFC 4954)
};

/// The world as the machine sees it.
class callbacks {
public:
    virtual ~callbacks() = default;
    /// The rules' decision on a recipient.
    virtual rules::decision evaluate(const rules::facts& f) = 0;
    /// A user store exists (AUTH is offered over TLS). Asked each time: a reload may add one.
    virtual bool auth_configured() = 0;
    /// Base64 as AUTH carries it; nullopt when malformed.
    virtual std::optional<std::string> base64_decode(const std::string& in) = 0;
    virtual void log(const log_entry& e) = 0;
};

/// What the machine knows of its session when it starts.
struct session_facts {
    std::string name;      ///< this tier's host name in replies
    std::string instance;  ///< the instance name in 421 replies
    std::string listener;
    rules::ip_address client;  ///< the client the rules judge
    std::uint64_t max_message_size = 0;
    std::uint64_t max_recipients = 0;
    std::chrono::milliseconds command_timeout{0};
    bool tls_offered = false;      ///< the listener has a certificate (STARTTLS)
    bool tls_active = false;
    bool trusted_peer = false;     ///< the peer is a previous tier (XCLIENT)
    upstream_capabilities upstream;
};

class machine {
public:
    virtual ~machine() = default;

    /// The greeting.
    virtual step start() = 0;
    virtual step on_command(const command& cmd) = 0;
    /// `parse_command` refused `line` with `reply`.
    virtual step on_syntax_error(std::string_view line, const std::string& reply) = 0;
    /// `next_line` found no line: bare_lf, bare_cr or too_long; `pending` is the input so far.
    virtual step on_bad_line(line_result r, std::string_view pending) = 0;
    virtual step on_line_skipped() = 0;
    virtual step on_auth_line(std::string_view line) = 0;
    virtual step on_auth_line_malformed() = 0;
    /// The outcome of `action::check_credentials` (the user store counts lockouts).
    virtual step on_credentials(const login_result& r) = 0;
    virtual step on_tls_started() = 0;
    /// DATA: consumes a prefix of `in`, returns how much.
    virtual std::size_t feed_data(std::string_view in) = 0;
    virtual bool data_complete() const = 0;
    virtual step on_data_end() = 0;
    /// BDAT: octets of the chunk (dropped when the chunk is refused).
    virtual void feed_chunk(std::string_view in) = 0;
    virtual step on_chunk_end() = 0;
    virtual step on_upstream_reply(const reply& r) = 0;
    /// The upstream failed (`why` says how): 421 to the client, the session ends.
    virtual step on_upstream_lost(const std::string& why) = 0;
    /// The client closed or timed out.
    virtual step on_client_closed(bool timed_out) = 0;

    virtual smtp::state state() const = 0;
    /// The replies said so far, in order; the session writes them.
    virtual std::string take_replies() = 0;
    virtual const std::string& ehlo() const = 0;
    virtual const std::string& user() const = 0;
    virtual int bad_commands() const = 0;
    /// The upstream session is still open (QUIT it at the end).
    virtual bool upstream_ready() const = 0;
};

std::unique_ptr<machine> make_machine(session_facts facts, callbacks& cb);

}  // namespace dmz::smtp
