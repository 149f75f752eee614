#pragma once
/// @file Strict HTTP/1.1 message heads (RFC 9112) and chunked framing, parsed from bytes.
/// No sockets: sessions hand in what they read and act on the result. Views point into
/// the caller's buffer and live as long as it does.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace dmz::http {

/// The field names the proxy acts on, recognised once when a head is parsed, so that the
/// per-field work after it compares a byte, not a name.
enum class field_id : std::uint8_t {
    other,
    // hop-by-hop, framing, and the forwarding fields a tier writes itself
    connection, keep_alive, proxy_connection, te, trailer, transfer_encoding, upgrade, proxy_authenticate,
    proxy_authorization, content_length, host, via, x_forwarded_for, forwarded, x_forwarded_proto, x_forwarded_host,
    // read, and passed on
    authorization, cookie, expect, www_authenticate, x_rps_cat,
};

/// The id of a field name (any case); field_id::other for the rest.
field_id classify_field(std::string_view name);

struct field {
    std::string_view name;
    std::string_view value;  ///< without leading/trailing whitespace
    field_id id = field_id::other;
};

enum class body_kind { none, length, chunked, until_close };

/// Why a message was refused. `status` is what the proxy answers (400, 413, 414, 431,
/// 501, 505 for requests; 502 for upstream responses); `code` is a stable short word for
/// the access log and X-Dmz-Error.
struct parse_error {
    int status = 400;
    std::string code;
    std::string detail;
};

struct limits {
    std::size_t max_request_line = 8 * 1024;
    std::size_t max_head_bytes = 64 * 1024;
    std::size_t max_fields = 100;
};

struct request_head {
    std::string_view method;
    std::string_view target;     ///< origin-form ("/owa/?x") after absolute-form is reduced
    std::string_view authority;  ///< from an absolute-form target, else empty
    int version_minor = 1;       ///< HTTP/1.0 or HTTP/1.1
    std::vector<field> fields;
    std::string_view host;  ///< the Host field (validated; may be empty for HTTP/1.0)
    body_kind body = body_kind::none;
    std::uint64_t content_length = 0;
    bool keep_alive = true;     ///< after Connection and version
    bool expect_continue = false;
    bool upgrade = false;       ///< Connection: upgrade with an Upgrade field
    std::size_t head_size = 0;  ///< bytes of the head including the final CRLF CRLF
    /// Lower-case names listed in Connection (hop-by-hop for this message).
    std::vector<std::string> connection_tokens;
    /// The field named `name` (case-insensitive); empty when absent. First one wins.
    std::string_view get(std::string_view name) const;
    std::string_view get(field_id id) const;
    std::size_t count(field_id id) const;
};

struct response_head {
    int status = 0;
    std::string_view reason;
    int version_minor = 1;
    std::vector<field> fields;
    body_kind body = body_kind::none;
    std::uint64_t content_length = 0;
    bool keep_alive = true;
    std::size_t head_size = 0;
    std::vector<std::string> connection_tokens;
    std::string_view get(std::string_view name) const;
    std::string_view get(field_id id) const;
};

enum class result { done, need_more, error };

/// Parses a request head from the start of `in`. need_more until the blank line has
/// arrived; error as soon as the bytes so far can never form a valid head. `out` is reset
/// first; its field vector keeps its capacity, so a head reused request after request
/// allocates nothing.
result parse_request(std::string_view in, const limits& lim, request_head& out, parse_error& err);

/// Parses a response head. `request_method` decides whether a body follows (HEAD).
result parse_response(std::string_view in, std::string_view request_method, const limits& lim,
                      response_head& out, parse_error& err);

/// Incremental decoder of chunked transfer coding. Feed bytes; it reports payload spans
/// and the end. Chunk extensions are checked and dropped; trailers are checked and dropped.
class chunked_decoder {
public:
    struct step {
        std::size_t consumed = 0;     ///< input bytes used by this step
        std::string_view data;        ///< payload bytes (a sub-view of the input), may be empty
        bool done = false;            ///< the last chunk and trailers are complete
    };
    explicit chunked_decoder(std::size_t max_line = 4096, std::size_t max_trailer = 16 * 1024)
        : max_line_(max_line), max_trailer_(max_trailer) {}
    /// Consumes a prefix of `in`. Returns false on malformed framing (err set).
    bool feed(std::string_view in, step& out, parse_error& err);
    bool done() const { return state_ == state::done; }
    /// The first chunk-size line (and its extensions) has been read completely.
    bool past_first_size_line() const {
        return state_ != state::size && state_ != state::size_ext && state_ != state::size_lf;
    }

private:
    enum class state { size, size_ext, size_lf, data, data_cr, data_lf, trailer_line, trailer_lf, done };
    /// One byte of framing (any state but data and done): moves the state on, or returns
    /// the error code and sets `detail`.
    const char* framing_byte(unsigned char c, const char*& detail);
    state state_ = state::size;
    std::uint64_t remaining_ = 0;
    int size_digits_ = 0;
    std::size_t line_len_ = 0;
    std::size_t trailer_bytes_ = 0;
    bool trailer_line_empty_ = true;
    std::size_t max_line_, max_trailer_;
};

/// Case-insensitive ASCII equality.
bool iequals(std::string_view a, std::string_view b);
/// RFC 9110 token characters.
bool is_token(std::string_view s);

}  // namespace dmz::http
