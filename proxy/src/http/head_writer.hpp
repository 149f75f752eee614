#pragma once
// The heads this tier sends on: re-serialized field by field from the parsed head, never
// copied raw, with hop-by-hop fields dropped and Via and the forwarding fields written anew.
// Pure functions over parsed heads: no sockets.
#include <string>
#include <string_view>
#include <vector>

#include "dmz/proxy/http/parser.hpp"
#include "dmz/rules/model.hpp"

namespace dmz::http {

/// Fields never copied from one hop to the next: hop-by-hop fields, framing this tier
/// re-creates, and the forwarding fields it writes itself.
bool dropped_field(field_id id);
/// `name: value\r\n` appended to `out`.
void append_field(std::string& out, std::string_view name, std::string_view value);
/// Connection-bound authentication (NTLM, Negotiate/Kerberos) in an Authorization or
/// WWW-Authenticate value: the upstream connection then belongs to one client connection.
bool connection_auth(std::string_view value);
bool starts_with_nocase(std::string_view s, std::string_view prefix);
/// "Mail.Contoso.com:443" -> "mail.contoso.com"; "[::1]:443" -> "::1".
std::string host_without_port(std::string_view host);
/// Whether a Via field lists `name` as a received-by (RFC 9110 7.6.3: "1.1 front-end").
bool via_names(std::string_view via, std::string_view name);
/// The value of cookie `name` in the head's Cookie fields, or "".
std::string cookie_value(const request_head& head, std::string_view name);
/// A Cookie field value without the cookie named `name`.
std::string without_cookie(std::string_view cookies, std::string_view name);
/// The client address a trusted previous tier reports: the last X-Forwarded-For entry.
std::string_view last_forwarded_for(const request_head& head);
std::string hex(std::size_t n);
/// The standard reason phrase of a status this tier sends ("Error" for others).
const char* reason_phrase(int status);

/// How a request head is rewritten toward the upstream.
struct request_rewrite {
    std::string_view path, query;  ///< normalized
    std::string_view host;         ///< the Host field to send
    std::string_view tier;         ///< this tier's name, for Via
    /// What happens to the client's Authorization: none strips it; basic forwards only the
    /// Basic credentials this tier validated (`validated_basic`); pass-through leaves it.
    rules::delegation delegation = rules::delegation::pass_through;
    bool validated_basic = false;
    /// Basic credentials of a forms session to send instead of the client's ("" for none).
    std::string session_authorization;
    bool session_replaces_authorization = false;
    bool strip_security_token = false;  ///< an ECP SecurityToken cookie (ProxyToken)
    std::string_view session_cookie;    ///< this tier's forms cookie, never sent upstream
    /// X-Forwarded-For and friends (the client address policy "forwarded").
    bool forwarded = false;
    std::string_view client;  ///< the original client's address, as text
    bool client_v6 = false;
    bool tls = false;  ///< the client connection is TLS
};

/// The request head toward the upstream. Sets `auth_on_connection` when the client's
/// Authorization that goes on is connection-bound (NTLM, Negotiate).
std::string write_request_head(const request_head& head, const request_rewrite& rw, bool& auth_on_connection);

/// How a response head is rewritten toward the client.
struct response_rewrite {
    std::string_view tier;
    std::string_view request_method;
    bool http10 = false;         ///< the client spoke HTTP/1.0
    bool chunk_to_client = false;
    bool close_client = false;   ///< this is the connection's last response
    std::string_view set_cookie; ///< a refreshed forms-session cookie, or ""
};

std::string write_response_head(const response_head& head, const response_rewrite& rw);

}  // namespace dmz::http
