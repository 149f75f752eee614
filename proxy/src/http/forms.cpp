// The forms listener's own pages (login, logout) and its session cookies. Every page is
// built as a reply; the phases send it.
#include <openssl/rand.h>

#include "dmz/proxy/users.hpp"
#include "http/head_writer.hpp"
#include "http/session.hpp"

namespace dmz::proxy {

using namespace net;

namespace {

/// The pages a forms listener serves itself, whatever the host.
constexpr const char* login_path = "/dmzproxy/auth/login";
constexpr const char* logout_path = "/dmzproxy/auth/logout";
constexpr std::size_t max_login_body = 8 * 1024;

/// Where a login may send the browser afterwards: a path on this site, nothing else (no
/// "//evil.example", no scheme, no control characters).
std::string safe_return_path(std::string_view url) {
    if (url.empty() || url.front() != '/' || url.size() > 2048) return "/";
    if (url.size() > 1 && (url[1] == '/' || url[1] == '\\')) return "/";
    for (unsigned char c : url)
        if (c < 0x21 || c == 0x7f || c == '\\') return "/";
    return std::string(url);
}

std::int64_t unix_now() {
    return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

/// A 302 this tier makes (login page, after a login), with any extra fields.
std::string found_response(const std::string& location, const std::string& extra_fields, bool keep, bool http10) {
    return std::string(http10 ? "HTTP/1.0" : "HTTP/1.1") + " 302 Found\r\nLocation: " + location +
           "\r\nCache-Control: no-store\r\nContent-Length: 0\r\n" + extra_fields + connection_field(keep, http10) + "\r\n";
}

/// A session id: 16 random bytes, or "" when the generator fails.
std::string session_id() {
    unsigned char rnd[16];
    if (RAND_bytes(rnd, sizeof rnd) != 1) return "";
    return base64url_encode(std::string(reinterpret_cast<char*>(rnd), sizeof rnd));
}

}  // namespace

bool http_session::forms_page_path(const http::request_head& head, bool& login) const {
    auto path = rules::to_lower(head.target.substr(0, head.target.find('?')));
    login = path == login_path;
    return login || path == logout_path || path == "/owa/logoff.owa" || path == "/owa/auth/logoff.aspx";
}

forms_request http_session::forms_request_of(const http::request_head& head, bool login) const {
    forms_request q;
    q.login = login;
    q.method = std::string(head.method);
    q.target = std::string(head.target);
    q.content_type = std::string(head.get("content-type"));
    q.cookie = http::cookie_value(head, lcfg().session.cookie);
    q.body = head.body;
    q.length = head.content_length;
    q.keep = head.keep_alive;
    q.http10 = head.version_minor == 0;
    return q;
}

task<http_session::reply> http_session::forms_page(const forms_request& q, const admission& a) {
    tx_.rec.rule = "(forms login)";
    if (!q.login) co_return logout_page(q);
    if (q.method == "GET" || q.method == "HEAD") co_return login_page(q);
    co_return co_await login(q, a);
}

local_reply http_session::logout_page(const forms_request& q) {
    tx_.rec.action = "logout";
    forms_session s;
    if (!q.cookie.empty() && check_session(q.cookie, s).empty()) {
        tx_.rec.user = s.user;
        rt_->revoked->revoke(s.id, std::chrono::system_clock::time_point(std::chrono::seconds(s.issued)) + lcfg().session.lifetime);
    }
    bool keep = q.keep && q.body == http::body_kind::none;  // a logout's body is not read: the connection ends
    auto wire = page(200, "Signed out",
                     "<main>\n<header><h1>You are signed out</h1></header>\n<div class=\"body\"><p><a href=\"" + std::string(login_path) +
                         "\">Sign in again</a></p></div>\n</main>\n",
                     keep,
                     q.http10, "Set-Cookie: " + expired_cookie() + "\r\nClear-Site-Data: \"cookies\"\r\n");
    return {std::move(wire), 200, keep};
}

local_reply http_session::login_page(const forms_request& q) {
    tx_.rec.action = "login-page";
    auto mark = q.target.find('?');
    auto query = mark == std::string::npos ? std::string() : q.target.substr(mark + 1);
    auto back = safe_return_path(form_field(query, "url").value_or("/"));
    auto reason = form_field(query, "reason").value_or("");
    bool keep = q.keep && q.body == http::body_kind::none;
    auto wire = page(200, "Sign in", login_form(back, reason == "expired" ? "Your session has ended. Please sign in again." : ""),
                     keep, q.http10);
    if (q.method == "HEAD") wire.erase(wire.find("\r\n\r\n") + 4);
    return {std::move(wire), 200, keep};
}

task<http_session::reply> http_session::login(const forms_request& q, const admission& a) {
    auto& rec = tx_.rec;
    rec.action = "login";
    if (q.method != "POST" || q.body != http::body_kind::length || q.length > max_login_body ||
        !rules::contains_nocase(q.content_type, "application/x-www-form-urlencoded"))
        co_return refusal(make_fault(fault_class::bad_request, q.body == http::body_kind::chunked || q.length > max_login_body ? 413 : 400,
                                     "a login is a POST of a url-encoded form of at most " + std::to_string(max_login_body) + " bytes"),
                          false, q.http10);
    auto length = static_cast<std::size_t>(q.length);
    if (!co_await read_exactly(length)) {
        rec.fault = make_fault(fault_class::bad_request, 0, "the client closed before its login form arrived");
        co_return local_reply{};
    }
    std::string form(in_.data().substr(0, length));
    in_.consume(length);
    rec.bytes_in += length;
    auto user = form_field(form, "username").value_or("");
    auto password = form_field(form, "password").value_or("");
    auto back = safe_return_path(form_field(form, "url").value_or("/"));
    rec.user = user;
    authenticator::result r;
    if (!user.empty()) {
        std::string listener = lcfg().name;  // named values: the check is awaited
        rules::lockout_policy policy = lcfg().lockout;
        r = co_await w_.auth.check(user, password, listener, a.client, policy);
    }
    if (r.overloaded) co_return refusal(auth_overloaded_fault(user), q.keep, q.http10);
    if (!r.ok) {
        // The same page for a wrong password, an unknown user and a locked-out one.
        rec.fault = make_fault(fault_class::auth_failed, 200,
                               "forms login refused for '" + user + "' (" + (user.empty() ? std::string("no user name") : r.refusal) + ")");
        co_return local_reply{page(200, "Sign in", login_form(back, "The user name or password is incorrect."), q.keep, q.http10), 200,
                              q.keep};
    }
    auto* stored = w_.auth.lookup(r.user);
    forms_session s;
    s.user = r.user;
    s.issued = s.last = unix_now();
    s.generation = stored ? hash_generation(stored->hash) : "";
    s.id = session_id();
    if (s.id.empty()) co_return refusal(make_fault(fault_class::internal, 500, "no random bytes for a session id"), false, q.http10);
    // Basic delegation needs the password at every request: it travels sealed in the cookie.
    s.password = password;
    rec.note = "forms login";
    co_return local_reply{found_response(back, "Set-Cookie: " + session_cookie(s) + "\r\n", q.keep, q.http10), 302, q.keep};
}

local_reply http_session::login_redirect(const http::request_head& head, const admission& a) {
    auto& rec = tx_.rec;
    rec.action = "login-page";
    const auto& why = a.session_problem;
    rec.fault = make_fault(fault_class::auth_required, 302, why.empty() ? "no session" : "session refused: " + why, a.d.rule_name);
    auto wire = found_response(std::string(login_path) + "?url=" + url_encode(head.target) + (why.empty() ? "" : "&reason=expired"),
                               why.empty() ? "" : "Set-Cookie: " + expired_cookie() + "\r\n", a.keep_if_refused, a.http10);
    return {std::move(wire), 302, a.keep_if_refused};
}

std::string http_session::cookie_attributes() const {
    return std::string("; Path=/; HttpOnly; SameSite=") + lcfg().session.same_site + (down_.is_tls() ? "; Secure" : "");
}

std::string http_session::session_cookie(const forms_session& s) const {
    return lcfg().session.cookie + "=" + rt_->sessions->seal(s) + cookie_attributes();
}

std::string http_session::expired_cookie() const { return lcfg().session.cookie + "=" + cookie_attributes() + "; Max-Age=0"; }

/// "" when the session cookie is good (and `s` holds it, `groups` the user's groups); else
/// why not. Schedules a refreshed cookie when the last one is older than a quarter of the
/// idle timeout.
std::string http_session::check_session(const std::string& value, forms_session& s, std::vector<std::string>* groups) {
    auto got = rt_->sessions->unseal(value);
    if (!got) return "not a valid session cookie";
    s = std::move(*got);
    auto now = unix_now();
    auto& p = lcfg().session;
    auto secs = [](rules::millis m) { return std::max<std::int64_t>(1, m.count() / 1000); };
    if (now - s.issued >= secs(p.lifetime)) return "session lifetime ended";
    if (now - s.last >= secs(p.idle)) return "session idle too long";
    if (rt_->revoked->revoked(s.id)) return "session was logged out";
    auto* u = w_.auth.lookup(s.user);
    if (!u || hash_generation(u->hash) != s.generation) return "user removed or password changed";
    if (groups) *groups = u->groups;
    if (now - s.last >= std::min<std::int64_t>(60, std::max<std::int64_t>(1, secs(p.idle) / 4))) {
        forms_session fresh = s;
        fresh.last = now;
        set_cookie_ = session_cookie(fresh);
    }
    return "";
}

namespace {
/// The sign-in look: a card on a quiet background with the realm in a band above the form,
/// as Outlook on the web's own page is laid out. Inline only (the CSP allows no other source).
constexpr const char* page_style =
    "*{box-sizing:border-box}"
    "body{margin:0;min-height:100vh;display:flex;align-items:center;justify-content:center;"
    "background:#f3f2f1;color:#201f1e;font:15px/1.45 'Segoe UI',system-ui,-apple-system,Roboto,'Helvetica Neue',Arial,sans-serif}"
    "main{width:100%;max-width:420px;margin:24px;background:#fff;box-shadow:0 2px 6px rgba(0,0,0,.2);border-radius:2px}"
    "header{background:#0f6cbd;color:#fff;padding:22px 32px}"
    "header h1{margin:0;font-size:22px;font-weight:600;overflow-wrap:anywhere}"
    "header p{margin:4px 0 0;font-size:13px;opacity:.9}"
    ".body{padding:24px 32px 28px}"
    "label{display:block;font-weight:600;margin:14px 0 4px}"
    "input[type=text],input[type=password]{width:100%;padding:8px 10px;font:inherit;border:1px solid #8a8886;border-radius:2px}"
    "input:focus{outline:2px solid #0f6cbd;outline-offset:1px;border-color:#0f6cbd}"
    ".hint{font-size:12px;color:#605e5c;margin:4px 0 0}"
    "button{margin-top:22px;width:100%;padding:10px;font:inherit;font-weight:600;color:#fff;background:#0f6cbd;"
    "border:0;border-radius:2px;cursor:pointer}"
    "button:hover{background:#115ea3}"
    ".error{margin:0 0 6px;padding:10px 12px;background:#fde7e9;color:#a4262c;border-left:4px solid #a4262c}"
    ".note{margin:18px 0 0;font-size:12px;color:#605e5c}"
    "a{color:#0f6cbd}";
}  // namespace

std::string http_session::page(int status, const std::string& title, const std::string& inner, bool keep, bool http10,
                               const std::string& extra_fields) const {
    std::string body = "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                       "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>" +
                       html_escape(title) + "</title>\n<style>" + page_style + "</style></head>\n<body>\n" + inner + "</body></html>\n";
    return std::string(http10 ? "HTTP/1.0 " : "HTTP/1.1 ") + std::to_string(status) + " " + http::reason_phrase(status) +
           "\r\nContent-Type: text/html; charset=utf-8\r\nCache-Control: no-store\r\nX-Frame-Options: DENY\r\n"
           "Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'\r\n"
           "Content-Length: " +
           std::to_string(body.size()) + "\r\n" + extra_fields + connection_field(keep, http10) + "\r\n" + body;
}

std::string http_session::login_form(const std::string& back, const std::string& message) const {
    auto realm = lcfg().realm.empty() ? rt_->name : lcfg().realm;
    return "<main>\n<header><h1>" + html_escape(realm) + "</h1><p>Sign in to continue</p></header>\n<div class=\"body\">\n" +
           (message.empty() ? std::string() : "<p class=\"error\" id=\"error\" role=\"alert\">" + html_escape(message) + "</p>\n") +
           "<form method=\"post\" action=\"" + login_path + "\">\n<input type=\"hidden\" name=\"url\" value=\"" + html_escape(back) +
           "\">\n<label for=\"username\">User name</label>\n"
           "<input type=\"text\" id=\"username\" name=\"username\" autocomplete=\"username\" autocapitalize=\"none\" "
           "spellcheck=\"false\" required autofocus aria-describedby=\"username-hint\"" +
           (message.empty() ? std::string() : " aria-invalid=\"true\"") +
           ">\n<p class=\"hint\" id=\"username-hint\">domain\\user name or user@domain</p>\n"
           "<label for=\"password\">Password</label>\n"
           "<input type=\"password\" id=\"password\" name=\"password\" autocomplete=\"current-password\" required>\n"
           "<button type=\"submit\">Sign in</button>\n</form>\n"
           "<p class=\"note\">Sign out and close the browser when you are done on a shared computer.</p>\n</div>\n</main>\n";
}

/// Reads `n` body bytes into in_ (small bodies only). False when the client went away.
task<bool> http_session::read_exactly(std::size_t n) {
    while (in_.size() < n) {
        std::size_t room = 0;
        char* p = in_.prepare(n - in_.size(), room);
        down_dog_.arm(lcfg().timeouts.head);
        error_code ec;
        auto got = co_await down_.read_some(asio::buffer(p, room), ec);
        if (ec) co_return false;
        in_.commit(got);
    }
    co_return true;
}

}  // namespace dmz::proxy
