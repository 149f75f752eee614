#pragma once
/// @file SMTP framing from bytes: command lines, commands, replies, the DATA stream and the
/// PROXY protocol v2 header. No sockets; sessions feed bytes and act on the results.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dmz::smtp {

/// RFC 5321 4.5.3.1: command line 512 octets and text line 1000 octets, CRLF included.
inline constexpr std::size_t max_command_line = 512;
inline constexpr std::size_t max_text_line = 1000;

enum class line_result { line, need_more, too_long, bare_lf, bare_cr };

/// Finds one CRLF-terminated line at the start of `in`. `line` excludes the CRLF;
/// `consumed` includes it.
line_result next_line(std::string_view in, std::size_t max_len, std::string_view& line, std::size_t& consumed);

struct command {
    std::string verb;       ///< upper case: EHLO, HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT, STARTTLS, AUTH, VRFY, HELP, ...
    std::string argument;   ///< the rest of the line after one space
    // MAIL / RCPT
    std::string path;       ///< the mailbox between < and >, "" for the null sender
    std::vector<std::pair<std::string, std::string>> params;  ///< ESMTP parameters, keys upper case
};

/// Parses a command line. Returns false with a reply ("501 5.5.4 ...") on a syntax error.
bool parse_command(std::string_view line, command& out, std::string& error_reply);

struct reply {
    int code = 0;
    std::vector<std::string> lines;  ///< text of each line, without the code and separator
    std::string text() const;        ///< all lines joined with " / "
    /// The reply as it goes on the wire, with CRLFs.
    std::string wire() const;
};

/// Parses one (possibly multi-line) reply from the start of `in`. 1 done, 0 need more,
/// -1 malformed.
int parse_reply(std::string_view in, reply& out, std::size_t& consumed);

/// Reads the DATA stream. Only CRLF.CRLF ends a message; a bare CR or LF anywhere, or a
/// line over 1000 octets, marks it refused, but reading goes on to the real end so the
/// session stays in step. Output keeps the wire form (dot-stuffing preserved) minus the
/// final ".\r\n".
///
/// In `raw` mode it reads BDAT chunks (RFC 3030) instead: the session hands it exactly
/// the chunks' octets, no line ends the message (`finish()` after the LAST chunk does),
/// there is no dot-stuffing, and the same checks apply, so that a message taken by BDAT
/// can go on by DATA with the same meaning. A last line without CRLF is refused too.
class data_reader {
public:
    explicit data_reader(std::uint64_t max_size, bool raw = false) : max_size_(max_size), raw_(raw) {}
    /// Consumes a prefix of `in`; returns how much. `done()` once the end arrived. In raw
    /// mode it consumes all of `in`.
    std::size_t feed(std::string_view in);
    /// Raw mode: the LAST chunk has been fed.
    void finish();
    bool done() const { return done_; }
    /// Empty when the message may be forwarded; else the reply that refuses it.
    const std::string& refusal() const { return refusal_; }
    const std::string& message() const { return message_; }
    std::string take_message() { return std::move(message_); }
    std::uint64_t size() const { return size_; }

private:
    void refuse(std::string r) {
        if (refusal_.empty()) refusal_ = std::move(r);
    }
    std::uint64_t max_size_;
    bool raw_ = false;
    std::string message_;
    std::string line_;  ///< the current line so far (bounded)
    std::uint64_t size_ = 0;
    bool pending_cr_ = false;
    bool done_ = false;
    std::size_t line_len_ = 0;
    std::string refusal_;
};

/// Dot-stuffing (RFC 5321 4.5.2) for a message of CRLF-terminated lines: a line that starts
/// with "." gets one more in front. And its undoing. In place: a message with no line
/// starting with "." (nearly all) is not copied.
void dot_stuff_in_place(std::string& message);
void dot_unstuff_in_place(std::string& stuffed);

/// The PROXY protocol v2 header (haproxy.org/download/2.9/doc/proxy-protocol.txt).
struct proxy_header {
    bool local = false;  ///< LOCAL command: no address (health checks)
    std::string source;  ///< the original client address
    std::uint16_t source_port = 0;
    std::string destination;
    std::uint16_t destination_port = 0;
    std::size_t size = 0;  ///< bytes of the header
};
/// 1 done, 0 need more, -1 not a valid v2 header.
int parse_proxy_v2(std::string_view in, proxy_header& out, std::string& error);
/// Builds a v2 PROXY header for a TCP connection (IPv4 or IPv6 textual addresses).
std::string make_proxy_v2(const std::string& src, std::uint16_t src_port, const std::string& dst, std::uint16_t dst_port);

/// The queue id in an end-of-data reply ("250 2.0.0 Ok: queued as 4F2A1", Exchange's
/// "250 2.6.0 <id@host> Queued mail for delivery"), or "".
std::string queue_id(const reply& r);

/// xtext (RFC 3461 4): "+XX" for octets outside 33..126 and for '+' and '='.
std::string xtext_encode(std::string_view in);
/// nullopt on a malformed "+XX" or an octet xtext never carries.
std::optional<std::string> xtext_decode(std::string_view in);

/// The decoded SASL PLAIN message "authzid NUL authcid NUL passwd" (RFC 4616). nullopt when
/// malformed, or when authzid names someone other than authcid (no proxy authorization).
struct plain_credentials {
    std::string user, password;
};
std::optional<plain_credentials> parse_sasl_plain(std::string_view decoded);

}  // namespace dmz::smtp
