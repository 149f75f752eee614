// One client connection: read head -> framing checks -> normalize -> evaluate rules ->
// authenticate -> pick upstream -> rewrite head -> pump bodies -> log, once per transaction.
#include <algorithm>
#include <charconv>
#include <cstring>
#include <optional>

#include <openssl/rand.h>
#include <unistd.h>

#include "dmz/proxy/http/parser.hpp"
#include "dmz/rules/guards.hpp"
#include "http/head_writer.hpp"
#include "dmz/rules/path.hpp"
#include "fault.hpp"
#include "dmz/proxy/users.hpp"
#include "runtime.hpp"
#include "auth/forms_cookie.hpp"

namespace dmz::proxy {

using namespace net;
using http::append_field;
using http::connection_auth;
using http::cookie_value;
using http::hex;
using http::reason_phrase;
using http::host_without_port;
using http::starts_with_nocase;
using http::via_names;
using clock_type = std::chrono::steady_clock;


namespace {

constexpr std::size_t pump_chunk = 64 * 1024;
/// A plain request body longer than this (beyond what came with the head) is spliced.
constexpr std::uint64_t splice_min = 256 * 1024;

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

/// Field vectors of heads already re-serialized, kept for the next head on this worker.
std::vector<std::vector<http::field>>& spare_fields() {
    thread_local std::vector<std::vector<http::field>> spares;
    return spares;
}

/// Gives `f` a spare vector's memory when it has none.
void borrow_fields(std::vector<http::field>& f) {
    auto& spares = spare_fields();
    if (f.capacity() == 0 && !spares.empty()) {
        f = std::move(spares.back());
        spares.pop_back();
    }
}

/// Takes `f`'s memory back to the spares (at most 64 of them), leaving `f` with none.
void return_fields(std::vector<http::field>& f) {
    auto& spares = spare_fields();
    if (f.capacity() != 0 && spares.size() < 64) {
        f.clear();
        spares.push_back(std::move(f));
    }
    std::vector<http::field>().swap(f);
}

/// A head's field vector on loan from the spares, back when the head is done with (or at
/// the latest when the loan ends): a request costs no allocation for its heads' fields, and
/// a request waiting for its answer holds none.
struct fields_loan {
    std::vector<http::field>& fields;
    ~fields_loan() { return_fields(fields); }
};

struct pump_signal {
    explicit pump_signal(asio::any_io_executor ex) : timer(ex) { timer.expires_at(clock_type::time_point::max()); }
    asio::steady_timer timer;
    bool done = false;
    bool ok = false;
    std::uint64_t bytes = 0;
    /// Set when the client broke the body's framing or limit: the client's fault, not the
    /// upstream's, whatever the upstream read then reports.
    std::optional<rules::fault> client_fault;
};

class http_session : public std::enable_shared_from_this<http_session> {
public:
    http_session(worker& w, std::shared_ptr<const instance_runtime> rt, const listener_runtime& l, std::string endpoint,
                 tcp::socket s)
        : w_(w), rt_(std::move(rt)), l_(&l), endpoint_(std::move(endpoint)), down_(make_stream(std::move(s), l)), down_dog_(w.io, down_),
          id_(next_connection_id()) {
        error_code ec;
        auto ep = down_.socket().remote_endpoint(ec);
        auto a = rules::ip_address::parse(ep.address().to_string());
        if (a) peer_ = *a;
        peer_text_ = peer_.to_string();
        down_.socket().set_option(tcp::no_delay(true), ec);
        trusted_peer_ = rt_->policy->trusts_forwarding_from(peer_);
    }

    /// A parked connection whose client spoke again: the same connection (id, peer, TLS
    /// session), judged by the snapshot current now.
    http_session(worker& w, std::shared_ptr<const instance_runtime> rt, const listener_runtime& l, parked_connection&& c,
                 stream s)
        : w_(w), rt_(std::move(rt)), l_(&l), endpoint_(std::move(c.endpoint)), counted_as_(std::move(c.counted_as)),
          down_(std::move(s)), down_dog_(w.io, down_), id_(c.id), peer_(c.peer), resumed_(true) {
        peer_text_ = peer_.to_string();
        trusted_peer_ = rt_->policy->trusts_forwarding_from(peer_);
        if (down_.is_tls()) sni_ = server_name(down_.native_tls());
    }

    ~http_session() {
        if (parked_) return;  // the parked record counts this connection now
        http_sessions().fetch_sub(1, std::memory_order_relaxed);
        w_.stats.connection(counted_as_, -1);
    }

    void start() {
        if (!resumed_) {  // a resumed connection was counted when it was first accepted
            http_sessions().fetch_add(1, std::memory_order_relaxed);
            counted_as_ = lcfg().name;
            w_.stats.connection(counted_as_, 1);
        }
        std::weak_ptr<http_session> weak = shared_from_this();
        w_.shutdown_hooks[id_] = [weak] {
            if (auto self = weak.lock()) self->drain();
        };
        spawn_guarded(w_, "http session", [self = shared_from_this()]() { return self->run(); });
    }

    /// The instance drains: an idle keep-alive connection closes now; one with a request in
    /// flight finishes it, answers with Connection: close, and closes.
    void drain() {
        if (idle_) down_.cancel();
    }

private:
    static stream make_stream(tcp::socket s, const listener_runtime& l) {
        if (l.tls) return stream(std::move(s), l.tls->default_context());
        return stream(std::move(s));
    }

    const rules::listener& lcfg() const { return *l_->cfg; }

    /// Between two requests: a reload happened, so the next request is judged by the new
    /// snapshot (a keep-alive connection between the tiers may last for hours). False when
    /// this address is no longer a listener of the same protocol: the connection closes.
    bool adopt(std::shared_ptr<const instance_runtime> next) {
        auto* l = next->bound_at(endpoint_);
        if (!l || l->cfg->proto != l_->cfg->proto) return false;
        rt_ = std::move(next);
        l_ = l;
        key_of_ = nullptr;
        trusted_peer_ = rt_->policy->trusts_forwarding_from(peer_);
        return true;
    }

    task<> run() {
        error_code ec;
        if (down_.is_tls() && !resumed_) {
            down_dog_.arm(lcfg().timeouts.head);
            co_await down_.handshake(true, ec);
            if (ec) {
                down_dog_.stop();
                down_.close();
                w_.shutdown_hooks.erase(id_);
                co_return;
            }
            sni_ = server_name(down_.native_tls());
        }
        bool first = !resumed_;
        while (true) {
            // Between requests only this small frame waits, with no buffer: a transaction's
            // frame (its record, head and limits) exists only while a request is in hand.
            // After parking_lot::park_after of that, the connection leaves for the parking
            // lot and this session ends (see park()).
            bool readable = false;
            if (w_.stopping && !first) break;  // draining: no new request on a kept connection
            if (w_.rt != rt_ && !adopt(w_.rt)) break;
            if (in_.empty()) {
                in_.release();
                bool may_park = !first && !pinned_ && !w_.stopping && !(down_.is_tls() && SSL_has_pending(down_.native_tls()));
                if (may_park) {
                    idle_since_ = clock_type::now();
                    // A new connection after its first request, with many sessions idle
                    // already (a burst of phones connecting): park at once, so a burst never
                    // piles up as sessions. Busy connections, and ones woken from the lot,
                    // wait park_after first, so they do not park and wake per request.
                    if (served_ == 1 && !resumed_ && w_.parked.waiting >= parking_lot::hot_sessions) {
                        if (park()) co_return;
                        break;
                    }
                    park_later_.arm(parking_lot::park_after);
                }
                down_dog_.arm(first ? lcfg().timeouts.head : lcfg().timeouts.idle);
                idle_ = true;
                // Plain, and few sessions waiting: read straight into a (recycled) buffer,
                // one system call where a readiness peek and then the read cost two. With
                // many waiting (a burst of new connections, or thousands of clients), the
                // wait holds no buffer until it parks. TLS: OpenSSL reads the descriptor.
                bool direct = !down_.is_tls() && w_.parked.waiting < parking_lot::hot_sessions;
                ++w_.parked.waiting;
                if (!direct) {
                    co_await down_.wait_readable(ec);
                } else {
                    std::size_t room = 0;
                    char* p = in_.prepare(4096, room);
                    auto n = co_await down_.read_some(asio::buffer(p, room), ec);
                    if (!ec) in_.commit(n);
                }
                --w_.parked.waiting;
                idle_ = false;
                park_later_.disarm();
                if (ec == asio::error::operation_aborted && parking_ && !down_dog_.expired() && !w_.stopping) {
                    if (park()) co_return;  // the lot has the connection; this session ends
                    break;
                }
                parking_ = false;
                if (ec || (w_.stopping && !first)) break;
                readable = true;
            }
            if (w_.rt != rt_ && !adopt(w_.rt)) break;  // reloaded while this connection idled
            bool keep = co_await transaction(first, readable);
            ++served_;
            if (relay_next_) {
                relay_next_ = false;
                keep = co_await relay(*plan_.rule, *plan_.to, plan_.head_out, plan_.body, plan_.content_length,
                                      plan_.client_keep_alive, plan_.http10, rec_, plan_.t0);
                if (answer_next_) {
                    answer_next_ = false;
                    up_dog_.emplace(w_.io, plan_.up->stream);
                    error_code wait_ec;
                    bool waited = false;
                    if (plan_.up->in.capacity() == 0) {
                        // The request is held upstream (an ActiveSync Ping, for minutes) with
                        // only this frame: relay()'s is gone and answer()'s not yet made.
                        up_dog_->arm(plan_.to->timeouts.read);
                        watch_soon(plan_.up, plan_.sig);
                        co_await plan_.up->stream.wait_readable(wait_ec);
                        waited = true;
                    }
                    keep = co_await answer(*plan_.rule, *plan_.to, plan_.method, plan_.expect_continue, plan_.auth_on_connection,
                                           plan_.client_keep_alive, plan_.http10, rec_, plan_.t0, wait_ec, waited);
                    up_dog_.reset();
                    plan_.up.reset();
                    plan_.sig.reset();
                }
            }
            watch_later_.disarm();
            if (!keep) break;
            first = false;
        }
        down_dog_.stop();
        if (pinned_) pinned_->stream.close();
        down_.close();
        w_.shutdown_hooks.erase(id_);
    }

    /// Hands the idle connection to the worker's parking lot. False: it could not be parked
    /// (the socket is then closed by the caller's normal end).
    bool park() {
        parking_ = false;
        in_.release();  // empty: the read was cancelled before any byte came
        down_dog_.stop();
        parked_connection c;
        c.proto = lcfg().proto;
        c.id = id_;
        c.peer = peer_;
        c.endpoint = endpoint_;
        c.counted_as = counted_as_;
        c.expires = idle_since_ + lcfg().timeouts.idle;
        error_code ec;
        auto local = down_.socket().local_endpoint(ec);
        if (ec) return false;
        c.v6 = local.address().is_v6();
        c.tls = down_.release_tls();
        c.fd = down_.socket().release(ec);
        if (ec) {
            c.fd = -1;
            return false;  // c.tls frees the TLS state; the socket closes with this session
        }
        w_.shutdown_hooks.erase(id_);
        parked_ = true;
        if (!w_.parked.park(std::move(c))) {
            parked_ = false;
            ::close(c.fd);  // not a session's socket any more: closed by hand
            return false;
        }
        return true;
    }

    access_record new_record() {
        access_record r;
        r.instance = rt_->name;
        r.conn = id_;
        r.client = peer_text_;
        r.original_client = peer_text_;
        r.listener = lcfg().name;
        return r;
    }

    void log(access_record& rec, clock_type::time_point t0) {
        rec.duration_ms = std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
        if (w_.stats.on) w_.stats.observe(rec, static_cast<std::int64_t>(w_.pool.idle_count()));
        w_.log.write(rec);
    }

    /// Answers with a generated response; fills the record. Returns whether the connection
    /// may carry another request.
    task<bool> send_fault(const rules::fault& f, bool keep_alive, bool http10, access_record& rec) {
        auto text = render_fault(f, rt_->name, rt_->role, keep_alive, http10, lcfg().realm);
        error_code ec;
        co_await down_.write(asio::buffer(text), ec);
        rec.status = f.status;
        rec.fault = f;
        if (rec.rule.empty()) rec.rule = f.rule;
        rec.bytes_out += text.size();
        if (rec.action.empty()) rec.action = "deny";
        co_return keep_alive && !ec;
    }

    /// send_fault, then the access-log line.
    task<bool> refuse(const rules::fault& f, bool keep_alive, bool http10, access_record& rec, clock_type::time_point t0) {
        bool keep = co_await send_fault(f, keep_alive, http10, rec);
        log(rec, t0);
        co_return keep;
    }

    // ---- forms sessions -------------------------------------------------------------------
    std::string cookie_attributes() const {
        return std::string("; Path=/; HttpOnly; SameSite=") + lcfg().session.same_site + (down_.is_tls() ? "; Secure" : "");
    }
    std::string session_cookie(const forms_session& s) const { return lcfg().session.cookie + "=" + rt_->sessions->seal(s) + cookie_attributes(); }
    std::string expired_cookie() const { return lcfg().session.cookie + "=" + cookie_attributes() + "; Max-Age=0"; }

    /// "" when the session cookie is good (and `s` holds it, `groups` the user's groups);
    /// else why not. Schedules a
    /// refreshed cookie when the last one is older than a quarter of the idle timeout.
    std::string check_session(const std::string& value, forms_session& s, std::vector<std::string>* groups = nullptr) {
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

    /// Writes a response this tier made; fills and writes the record.
    task<bool> answer(const std::string& resp, int status, bool keep, access_record& rec, clock_type::time_point t0) {
        error_code ec;
        co_await down_.write(asio::buffer(resp), ec);
        rec.status = status;
        rec.bytes_out += resp.size();
        log(rec, t0);
        co_return keep && !ec;
    }

    std::string page(int status, const std::string& title, const std::string& inner, bool keep, bool http10,
                     const std::string& extra_fields = {}) const {
        std::string body = "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + html_escape(title) +
                           "</title>\n<style>body{font-family:sans-serif;max-width:26em;margin:4em auto}"
                           "label,input{display:block;width:100%;margin:.3em 0}.error{color:#b00}</style></head>\n<body>\n" +
                           inner + "</body></html>\n";
        return std::string(http10 ? "HTTP/1.0 " : "HTTP/1.1 ") + std::to_string(status) + " " + reason_phrase(status) +
               "\r\nContent-Type: text/html; charset=utf-8\r\nCache-Control: no-store\r\nX-Frame-Options: DENY\r\n"
               "Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'\r\n"
               "Content-Length: " + std::to_string(body.size()) + "\r\n" + extra_fields +
               connection_field(keep, http10) + "\r\n" + body;
    }

    /// A 302 this tier makes (login page, after a login), with any extra fields.
    static std::string found_response(const std::string& location, const std::string& extra_fields, bool keep, bool http10) {
        return std::string(http10 ? "HTTP/1.0" : "HTTP/1.1") + " 302 Found\r\nLocation: " + location +
               "\r\nCache-Control: no-store\r\nContent-Length: 0\r\n" + extra_fields + connection_field(keep, http10) + "\r\n";
    }

    std::string login_form(const std::string& back, const std::string& message) const {
        auto realm = lcfg().realm.empty() ? rt_->name : lcfg().realm;
        return "<h1>" + html_escape(realm) + "</h1>\n" +
               (message.empty() ? std::string() : "<p class=\"error\">" + html_escape(message) + "</p>\n") +
               "<form method=\"post\" action=\"" + login_path + "\">\n<input type=\"hidden\" name=\"url\" value=\"" +
               html_escape(back) + "\">\n<label>User name <input name=\"username\" autocomplete=\"username\"></label>\n"
               "<label>Password <input name=\"password\" type=\"password\" autocomplete=\"current-password\"></label>\n"
               "<input type=\"submit\" value=\"Sign in\">\n</form>\n";
    }

    /// Reads `n` body bytes into in_ (small bodies only). False when the client went away.
    task<bool> read_exactly(std::size_t n) {
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

    /// The login page (GET), a login (POST), or a logout (any method).
    task<bool> forms_page(bool login, http::request_head& head, access_record& rec, clock_type::time_point t0,
                          const rules::ip_address& client) {
        bool http10 = head.version_minor == 0;
        std::string method(head.method), target(head.target), content_type(head.get("content-type"));
        std::string cookie = cookie_value(head, lcfg().session.cookie);
        auto body = head.body;
        auto length = head.content_length;
        bool keep = head.keep_alive;
        in_.consume(head.head_size);
        rec.rule = "(forms login)";
        if (!login) {
            rec.action = "logout";
            forms_session s;
            if (!cookie.empty() && check_session(cookie, s).empty()) {
                rec.user = s.user;
                rt_->revoked->revoke(s.id, std::chrono::system_clock::time_point(std::chrono::seconds(s.issued)) + lcfg().session.lifetime);
            }
            if (body != http::body_kind::none) {
                // A logout has nothing to say in a body: drop the connection after answering.
                keep = false;
            }
            auto resp = page(200, "Signed out", "<h1>You are signed out</h1>\n<p><a href=\"" + std::string(login_path) + "\">Sign in again</a></p>\n",
                             keep, http10, "Set-Cookie: " + expired_cookie() + "\r\nClear-Site-Data: \"cookies\"\r\n");
            co_return co_await answer(resp, 200, keep, rec, t0);
        }
        auto query = target.find('?') == std::string::npos ? std::string() : target.substr(target.find('?') + 1);
        if (method == "GET" || method == "HEAD") {
            rec.action = "login-page";
            auto back = safe_return_path(form_field(query, "url").value_or("/"));
            auto reason = form_field(query, "reason").value_or("");
            auto resp = page(200, "Sign in", login_form(back, reason == "expired" ? "Your session has ended. Please sign in again." : ""),
                             keep && body == http::body_kind::none, http10);
            if (method == "HEAD") resp.erase(resp.find("\r\n\r\n") + 4);
            co_return co_await answer(resp, 200, keep && body == http::body_kind::none, rec, t0);
        }
        rec.action = "login";
        if (method != "POST" || body != http::body_kind::length || length > max_login_body ||
            !rules::contains_nocase(content_type, "application/x-www-form-urlencoded")) {
            rules::fault fr = make_fault(fault_class::bad_request, body == http::body_kind::chunked || length > max_login_body ? 413 : 400, "a login is a POST of a url-encoded form of at most " + std::to_string(max_login_body) + " bytes", "");
            co_return co_await refuse(fr, false, http10, rec, t0);
        }
        if (!co_await read_exactly(length)) co_return false;
        std::string form(in_.data().substr(0, length));
        in_.consume(length);
        rec.bytes_in += length;
        auto user = form_field(form, "username").value_or("");
        auto password = form_field(form, "password").value_or("");
        auto back = safe_return_path(form_field(form, "url").value_or("/"));
        rec.user = user;
        authenticator::result r;
        if (!user.empty()) r = co_await w_.auth.check(user, password, lcfg().name, client, lcfg().lockout);
        if (r.overloaded) {
            rules::fault fr = auth_overloaded_fault(user);
            co_return co_await refuse(fr, keep, http10, rec, t0);
        }
        if (!r.ok) {
            // The same page for a wrong password, an unknown user and a locked-out one.
            rec.fault = make_fault(fault_class::auth_failed, 200,
                                   "forms login refused for '" + user + "' (" + (user.empty() ? std::string("no user name") : r.refusal) + ")");
            auto resp = page(200, "Sign in", login_form(back, "The user name or password is incorrect."), keep, http10);
            co_return co_await answer(resp, 200, keep, rec, t0);
        }
        auto* stored = w_.auth.lookup(r.user);
        forms_session s;
        s.user = r.user;
        s.issued = s.last = unix_now();
        s.generation = stored ? hash_generation(stored->hash) : "";
        unsigned char rnd[16];
        RAND_bytes(rnd, sizeof rnd);
        s.id = base64url_encode(std::string(reinterpret_cast<char*>(rnd), sizeof rnd));
        // Basic delegation needs the password at every request: it travels sealed in the cookie.
        s.password = password;
        rec.note = "forms login";
        auto resp = found_response(back, "Set-Cookie: " + session_cookie(s) + "\r\n", keep, http10);
        co_return co_await answer(resp, 302, keep, rec, t0);
    }

    // ---- phase 1: read the head -------------------------------------------------------
    /// `readable`: the client's socket has just shown bytes (read them, do not wait again).
    task<bool> transaction(bool first, bool readable) {
        access_record& rec = rec_;  // a member: relay() uses it after this frame is gone
        rec = new_record();
        auto t0 = clock_type::now();
        http::limits hl{lcfg().limits.max_request_line, lcfg().limits.max_header_bytes, lcfg().limits.max_headers};
        if (trusted_peer_) {
            // A previous tier adds Via and the forwarding fields to what its own limits let
            // through: leave room for them, or the back-end refuses what the front-end took.
            hl.max_head_bytes += 8 * 1024;
            hl.max_fields += 16;
            hl.max_request_line += 1024;
        }
        http::request_head head;
        fields_loan loan{head.fields};
        http::parse_error perr;
        bool got_bytes = !in_.empty();
        bool parse_now = got_bytes;  // pipelined bytes from the previous request
        down_dog_.arm(got_bytes || (first && !down_.is_tls()) ? lcfg().timeouts.head : lcfg().timeouts.idle);
        while (true) {
            if (parse_now) {
                borrow_fields(head.fields);
                auto r = http::parse_request(in_.data(), hl, head, perr);
                if (r == http::result::done) break;
                if (r == http::result::error) {
                    rec.method = "-";
                    {
                        // Named, not a temporary in the co_await: GCC 12 destroys those twice.
                        rules::fault fr = make_fault(fault_class::bad_request, perr.status, perr.code + ": " + perr.detail, "");
                        co_return co_await refuse(fr,
                                              false, false, rec, t0);
                    }
                }
            }
            error_code ec;
            std::size_t n = 0;
            char* p = nullptr;
            if (in_.empty() && !readable) {
                in_.release();  // idle between requests: no buffer until bytes arrive
                co_await down_.wait_readable(ec);
            }
            readable = false;
            if (!ec) {
                std::size_t room = 0;
                p = in_.prepare(in_.size() < 4096 ? 4096 : in_.size(), room);
                n = co_await down_.read_some(asio::buffer(p, room), ec);
            }
            if (ec) {
                if (down_dog_.expired() && got_bytes) {
                    rec.method = "-";
                    {
                        // Named, not a temporary in the co_await: GCC 12 destroys those twice.
                        rules::fault fr = make_fault(fault_class::bad_request, 408, "request-timeout: the request head did not arrive within " +
                                                                                  std::to_string(lcfg().timeouts.head.count() / 1000) + " s", "");
                        co_return co_await refuse(fr,
                                              false, false, rec, t0);
                    }
                }
                co_return false;
            }
            in_.commit(n);
            // Parse again only when a line may have ended (or the limit is reached): a head
            // sent a byte at a time must not cost a full parse per byte.
            parse_now = std::memchr(p, '\n', n) != nullptr || in_.size() > hl.max_head_bytes ||
                        std::memchr(p, '\0', n) != nullptr;
            if (!got_bytes) {
                got_bytes = true;
                t0 = clock_type::now();
                down_dog_.arm(lcfg().timeouts.head);
            }
        }
        rec.bytes_in = head.head_size;
        co_return co_await forward(head, rec, t0);
    }

    // ---- phases 2-8 -----------------------------------------------------------------------
    task<bool> forward(http::request_head& head, access_record& rec, clock_type::time_point t0) {
        bool http10 = head.version_minor == 0;
        bool has_body = head.body != http::body_kind::none;
        if (w_.stopping) head.keep_alive = false;  // draining: every answer now closes
        bool keep_if_refused = head.keep_alive && !has_body;
        std::string host = host_without_port(head.host);
        rec.method = std::string(head.method);
        rec.host = host;
        rec.path = std::string(head.target);

        // The same instance in Via: the request went around (TMG 12206).
        for (auto& f : head.fields)
            if (f.id == http::field_id::via && via_names(f.value, rt_->name)) {
                in_.consume(head.head_size);
                {
                    // Named, not a temporary in the co_await: GCC 12 destroys those twice.
                    rules::fault fr = make_fault(fault_class::rule_denied, 508, "loop: the request already passed through " + rt_->name + " (TMG 12206)", "");
                    co_return co_await refuse(fr,
                                          keep_if_refused, http10, rec, t0);
                }
            }

        // The client: the peer, or what a trusted previous tier says it saw.
        rules::ip_address client = peer_;
        if (trusted_peer_) {
            if (auto a = rules::ip_address::parse(http::last_forwarded_for(head))) client = *a;
        }
        rec.original_client = client == peer_ ? peer_text_ : client.to_string();

        if (lcfg().redirect_to_https) {
            std::string loc = "https://" + std::string(head.host) + std::string(head.target);
            std::string resp = "HTTP/1.1 301 Moved Permanently\r\nLocation: " + loc +
                               "\r\nContent-Length: 0\r\n" + (keep_if_refused ? "" : "Connection: close\r\n") + "\r\n";
            in_.consume(head.head_size);
            error_code ec;
            co_await down_.write(asio::buffer(resp), ec);
            rec.status = 301;
            rec.action = "redirect";
            rec.bytes_out = resp.size();
            log(rec, t0);
            co_return keep_if_refused && !ec;
        }

        // ---- forms listeners: the login and logout pages, then the session cookie ----
        std::string user, tried_user, why_refused;
        std::vector<std::string> groups;
        bool forms = lcfg().auth == rules::auth_mode::forms && rt_->sessions;
        set_cookie_.clear();
        forms_session session;
        bool have_session = false;
        std::string session_problem;
        if (forms) {
            auto path = rules::to_lower(head.target.substr(0, head.target.find('?')));
            if (path == login_path || path == logout_path || path == "/owa/logoff.owa" || path == "/owa/auth/logoff.aspx")
                co_return co_await forms_page(path == login_path, head, rec, t0, client);
            auto value = cookie_value(head, lcfg().session.cookie);
            if (!value.empty()) {
                session_problem = check_session(value, session, &groups);
                have_session = session_problem.empty();
                if (have_session) user = session.user;
            }
        }

        // ---- authenticate (basic and forms listeners validate Basic credentials) ----
        bool validates = lcfg().auth == rules::auth_mode::basic || lcfg().auth == rules::auth_mode::forms;
        auto authz = head.get(http::field_id::authorization);
        bool busy = false;  // the password checks' queue was full: 503, not 401
        if (validates && starts_with_nocase(authz, "basic ")) {
            user.clear();
            groups.clear();
            have_session = false;
            set_cookie_.clear();
            auto token = std::string(authz.substr(6));
            while (!token.empty() && token.front() == ' ') token.erase(0, 1);
            auto decoded = base64_decode(token);
            auto colon = decoded ? decoded->find(':') : std::string::npos;
            if (colon != std::string::npos) {
                tried_user = decoded->substr(0, colon);
                auto password = decoded->substr(colon + 1);  // named: the check is awaited
                auto r = co_await w_.auth.check(tried_user, password, lcfg().name, client, lcfg().lockout);
                if (r.ok) user = r.user, groups = r.groups;
                else why_refused = r.refusal;
                busy = r.overloaded;
            }
            if (user.empty()) {
                in_.consume(head.head_size);
                rec.user = tried_user;
                rules::fault fr = busy ? auth_overloaded_fault(tried_user) : make_fault(fault_class::auth_failed, 401, "the credentials" + (tried_user.empty() ? std::string() : " for '" + tried_user + "'") + " were refused",
                                  "");
                bool keep = co_await send_fault(fr, keep_if_refused, http10, rec);
                // The client hears only "refused"; the log says why (no user enumeration).
                rec.fault.detail += why_refused.empty() ? "" : " (" + why_refused + ")";
                log(rec, t0);
                co_return keep;
            }
        }
        rec.user = user;

        // ---- evaluate rules ----
        rules::facts f;
        f.listener = lcfg().name;
        f.client = client;
        if (down_.is_tls()) f.sni = sni_;
        f.host = host;
        f.method = std::string(head.method);
        f.target = std::string(head.target);
        f.who = user.empty() ? rules::identity::anonymous : rules::identity::authenticated;
        f.user = user;
        f.groups = groups;
        auto d = rt_->policy->evaluate(f, {.trace = false});
        rec.rule = d.rule_name;
        rec.path = d.path.safe() ? d.path.path + (d.path.query.empty() ? "" : "?" + d.path.query) : std::string(head.target);
        if (d.result != rules::verdict::allow && forms && d.why == fault_class::auth_required && authz.empty() &&
            (head.method == "GET" || head.method == "HEAD") && rules::contains_nocase(head.get("accept"), "text/html")) {
            // A browser on a forms listener gets the login page; clients that cannot do forms
            // (ActiveSync, Outlook, EWS) get the Basic challenge below.
            std::string back(head.target);
            in_.consume(head.head_size);
            rec.rule = d.rule_name;
            rec.action = "login-page";
            rec.fault = make_fault(fault_class::auth_required, 302,
                                   session_problem.empty() ? "no session" : "session refused: " + session_problem, d.rule_name);
            auto resp = found_response(std::string(login_path) + "?url=" + url_encode(back) +
                                           (session_problem.empty() ? "" : "&reason=expired"),
                                       session_problem.empty() ? "" : "Set-Cookie: " + expired_cookie() + "\r\n", keep_if_refused,
                                       http10);
            co_return co_await answer(resp, 302, keep_if_refused, rec, t0);
        }
        if (d.result != rules::verdict::allow) {
            in_.consume(head.head_size);
            auto fr = d.refusal();
            if (!d.path.safe()) fr.detail = "path refused (" + d.path.unsafe + "); " + fr.detail;
            co_return co_await refuse(fr, keep_if_refused, http10, rec, t0);
        }
        const rules::rule& rule = *d.matched;
        const rules::target& to = *rule.to;
        rec.action = "allow";
        if (key_of_ != &to) {  // the snapshot this session holds keeps `to` where it is
            key_ = pool_key(to);
            target_text_ = endpoint_text(*to.address, to.port);
            key_of_ = &to;
        }
        rec.target = target_text_;

        // ---- the Exchange template's guards on headers ----
        rules::exchange_guard guard(rule, d.path);
        if (rule.exchange_guards) {
            for (auto& fld : head.fields) {
                if (fld.id == http::field_id::cookie) guard.cookie(fld.value);
                if (fld.id == http::field_id::x_rps_cat) guard.rps_cat_field();
            }
            if (auto refused = guard.refusal()) {
                in_.consume(head.head_size);
                co_return co_await refuse(*refused, keep_if_refused, http10, rec, t0);
            }
        }
        if (rule.max_body && head.body == http::body_kind::length && head.content_length > rule.max_body) {
            in_.consume(head.head_size);
            {
                // Named, not a temporary in the co_await: GCC 12 destroys those twice.
                rules::fault fr = make_fault(fault_class::bad_request, 413, "request body of " + std::to_string(head.content_length) + " bytes exceeds the rule's limit of " +
                                           std::to_string(rule.max_body),
                                       rule.name);
                co_return co_await refuse(fr,
                                      false, http10, rec, t0);
            }
        }

        // ---- rewrite the head (re-serialized, never copied raw) ----
        bool auth_on_connection = false;
        auto deleg = rule.delegate.value_or(validates ? rules::delegation::basic : rules::delegation::pass_through);
        http::request_rewrite rw;
        rw.path = d.path.path;
        rw.query = d.path.query;
        rw.host = to.host_policy == rules::host_header::target && !to.name.empty() ? std::string_view(to.name) : head.host;
        rw.tier = rt_->name;
        rw.delegation = deleg;
        rw.validated_basic = validates;
        rw.session_replaces_authorization = have_session && deleg == rules::delegation::basic;
        if (rw.session_replaces_authorization && !session.password.empty())
            rw.session_authorization = "Basic " + base64_encode(session.user + ":" + session.password);
        rw.strip_security_token = guard.strip_security_token();
        if (forms) rw.session_cookie = lcfg().session.cookie;
        rw.forwarded = to.client_policy == rules::client_address::forwarded;
        rw.client = rec.original_client;
        rw.client_v6 = !client.is_v4();
        rw.tls = down_.is_tls();
        std::string out = http::write_request_head(head, rw, auth_on_connection);
        bool expect_continue = head.expect_continue;
        auto body = head.body;
        auto content_length = head.content_length;
        bool client_keep_alive = head.keep_alive;
        std::string method(head.method);
        in_.consume(head.head_size);  // the head's views end here
        return_fields(head.fields);
        // While the request waits upstream (an ActiveSync Ping for minutes) it holds no
        // client buffer (the parsed head goes with transaction()'s frame).
        if (in_.empty()) in_.release();

        // A chunked body's first size line is checked before anything goes upstream, so
        // the commonest framing attack forwards nothing at all.
        if (body == http::body_kind::chunked) {
            http::parse_error cerr;
            int v = co_await check_first_chunk(cerr);
            if (v < 0) {
                rules::fault fr = make_fault(fault_class::bad_request, cerr.status, cerr.code + ": " + cerr.detail, rule.name);
                co_return co_await refuse(fr, false, http10, rec, t0);
            }
            if (v == 0) {
                rec.fault = make_fault(fault_class::bad_request, 0, "the client closed before the chunked body began");
                log(rec, t0);
                co_return false;
            }
        }

        // run() relays: this frame and transaction()'s are gone while the request waits
        // upstream (an ActiveSync Ping holds for minutes).
        plan_.rule = &rule;
        plan_.to = &to;
        plan_.head_out = std::move(out);
        plan_.method = std::move(method);
        plan_.body = body;
        plan_.content_length = content_length;
        plan_.expect_continue = expect_continue;
        plan_.auth_on_connection = auth_on_connection;
        plan_.client_keep_alive = client_keep_alive;
        plan_.http10 = http10;
        plan_.t0 = t0;
        relay_next_ = true;
        co_return true;
    }

    /// Reads until the first chunk-size line of the body is complete. 1: valid; -1: bad
    /// framing (err set); 0: the client went away or timed out.
    task<int> check_first_chunk(http::parse_error& err) {
        while (true) {
            http::chunked_decoder probe;
            auto avail = in_.data();
            while (!avail.empty() && !probe.past_first_size_line()) {
                http::chunked_decoder::step st;
                if (!probe.feed(avail, st, err)) co_return -1;
                avail.remove_prefix(st.consumed);
            }
            if (probe.past_first_size_line()) co_return 1;
            std::size_t room = 0;
            char* p = in_.prepare(4096, room);
            error_code ec;
            down_dog_.arm(lcfg().timeouts.head);
            auto n = co_await down_.read_some(asio::buffer(p, room), ec);
            if (ec) co_return 0;
            in_.commit(n);
        }
    }

    static std::string pool_key(const rules::target& to) {
        std::string k = endpoint_text(*to.address, to.port);
        if (to.source) k += "<" + to.source->to_string();
        if (to.tls) k += "|tls|" + to.name + "|" + to.ca_file;
        return k;
    }

    // ---- phases 6-8: pick upstream, send, pump both ways ------------------------------
    /// Phases 6-7: an upstream connection (pinned, pooled or new), the head sent, the body's
    /// pump started. Then run() awaits the answer.
    task<bool> relay(const rules::rule& rule, const rules::target& to, std::string& head_out, http::body_kind body,
                     std::uint64_t content_length, bool client_keep_alive, bool http10, access_record& rec,
                     clock_type::time_point t0) {
        bool has_body = body != http::body_kind::none;
        const std::string& key = key_;  // set with target_text_ for this `to`
        std::shared_ptr<upstream_conn> up;
        for (int attempt = 0; attempt < 2; ++attempt) {
            bool fresh = false;
            if (pinned_ && pinned_->key == key) {
                up = std::move(pinned_);
                rec.upstream_conn = "pinned";
                if (!still_open(*up)) {
                    up->stream.close();
                    rec.fault = make_fault(fault_class::upstream_connect, 0,
                                           "the pinned upstream connection closed; closing the client connection with it");
                    log(rec, t0);
                    co_return false;
                }
            } else if ((up = w_.pool.take(key, to.timeouts.idle, has_body))) {
                rec.upstream_conn = "reused";
            } else {
                rules::fault f;
                up = co_await connect_upstream(w_.io, w_.upstream_tls, to, key, f);
                if (!up) {
                    f.rule = rule.name;
                    co_return co_await refuse(f, client_keep_alive && !has_body, http10, rec, t0);
                }
                rec.upstream_conn = "new";
                fresh = true;
            }
            error_code ec;
            co_await up->stream.write(asio::buffer(head_out), ec);
            if (!ec) break;
            up->stream.close();
            up.reset();
            if (rec.upstream_conn == "pinned") {
                // The authenticated upstream is gone: the client connection goes too, so the
                // client starts its handshake again instead of landing on a stranger's socket.
                rec.status = 0;
                rec.fault = make_fault(fault_class::upstream_connect, 0, "the pinned upstream connection closed: " + ec.message());
                log(rec, t0);
                co_return false;
            }
            if (fresh || attempt == 1)
                {
                    // Named, not a temporary in the co_await: GCC 12 destroys those twice.
                    rules::fault fr = make_fault(fault_class::upstream_connect, 502, "sending to the upstream failed: " + ec.message(), rule.name);
                    co_return co_await refuse(fr,
                                          false, http10, rec, t0);
                }
        }
        up->requests++;
        std::string().swap(head_out);  // sent: not kept while the answer is awaited

        // The request body flows on its own while the response is read: an upstream may
        // answer (401, 413) before the body ends, and RPC channels stream for hours.
        auto sig = std::make_shared<pump_signal>(w_.io.get_executor());
        if (has_body) {
            spawn_guarded(w_, "http request body pump", [self = shared_from_this(), up, sig, body, content_length, idle = to.timeouts.idle, limit = rule.max_body]() {
                               return self->pump_request(up, sig, body, content_length, idle, limit);
                           });
        } else {
            sig->done = sig->ok = true;
        }
        // run() waits for the answer and then calls answer(): while the request is held
        // upstream, this frame is gone.
        plan_.up = std::move(up);
        plan_.sig = std::move(sig);
        answer_next_ = true;
        co_return true;
    }

    /// Phase 8: the upstream's answer toward the client. `waited`: run() already waited for
    /// the upstream to become readable, with `wait_ec` as the outcome.
    task<bool> answer(const rules::rule& rule, const rules::target& to, const std::string& method, bool expect_continue,
                      bool auth_on_connection, bool client_keep_alive, bool http10, access_record& rec, clock_type::time_point t0,
                      error_code wait_ec, bool waited) {
        auto& up = plan_.up;
        auto& sig = plan_.sig;
        watchdog& up_dog = *up_dog_;
        bool close_client = !client_keep_alive;
        enum class fate { close, pool, pin };
        // The one exit of a relayed transaction: stop the request pump if it still runs,
        // decide what becomes of the upstream connection, log.
        auto finish = [&](bool keep_client, fate f) -> task<bool> {
            co_await stop_watch();
            if (client_gone_) {
                keep_client = false;
                f = fate::close;
                if (!rec.fault) rec.note = "the client closed the connection while its answer was pending";
            }
            if (!sig->done) {
                up->stream.close();
                down_.cancel();
                error_code ec;
                co_await sig->timer.async_wait(redirect(ec));
                keep_client = false;
                f = fate::close;
            }
            rec.bytes_in += sig->bytes;
            if (!sig->ok) f = fate::close, keep_client = false;
            if (f == fate::pin && keep_client) pinned_ = up;
            else if (f == fate::pool) w_.pool.put(up);
            else up->stream.close();
            log(rec, t0);
            co_return keep_client;
        };

        // ---- the response head ----
        http::response_head resp;
        fields_loan loan{resp.fields};
        http::parse_error perr;
        http::limits rl{8192, 64 * 1024, 200};
        while (true) {
            if (!up->in.empty()) {
                borrow_fields(resp.fields);  // only now: a held request waits without one
                auto r = http::parse_response(up->in.data(), method, rl, resp, perr);
                if (r == http::result::error) {
                    {
                        // Named, not a temporary in the co_await: GCC 12 destroys those twice.
                        rules::fault fr = make_fault(fault_class::upstream_protocol, 502, perr.code + ": " + perr.detail, rule.name);
                        co_await send_fault(fr, false,
                                        http10, rec);
                    }
                    co_return co_await finish(false, fate::close);
                }
                if (r == http::result::done) {
                    if (resp.status == 100) {
                        up->in.consume(resp.head_size);
                        if (expect_continue) {
                            static const std::string cont = "HTTP/1.1 100 Continue\r\n\r\n";
                            error_code ec;
                            co_await down_.write(asio::buffer(cont), ec);
                            rec.bytes_out += cont.size();
                        }
                        continue;
                    }
                    if (resp.status == 101 || (resp.status > 101 && resp.status < 200)) {
                        // No protocol switching through a publishing proxy; other 1xx are dropped.
                        if (resp.status == 101) {
                            {
                                // Named, not a temporary in the co_await: GCC 12 destroys those twice.
                                rules::fault fr = make_fault(fault_class::upstream_protocol, 502, "the upstream switched protocols (101)", rule.name);
                                co_await send_fault(fr,
                                                false, http10, rec);
                            }
                            co_return co_await finish(false, fate::close);
                        }
                        up->in.consume(resp.head_size);
                        continue;
                    }
                    break;
                }
            }
            error_code ec;
            std::size_t n = 0;
            if (waited) {
                ec = wait_ec;  // run()'s wait, its deadline included (not re-armed here)
                waited = false;
            } else {
                up_dog.arm(to.timeouts.read);
                watch_soon(up, sig);
                // A held request (an ActiveSync Ping, an RPC channel) on a new connection waits
                // without a buffer; a pooled connection has its buffer already and reads at once.
                if (up->in.capacity() == 0) co_await up->stream.wait_readable(ec);
            }
            if (!ec) {
                std::size_t room = 0;
                char* p = up->in.prepare(4096, room);
                n = co_await up->stream.read_some(asio::buffer(p, room), ec);
            }
            if (ec) {
                if (client_gone_) {
                    co_return co_await finish(false, fate::close);
                } else if (sig->done && sig->client_fault) {
                    auto cf = *sig->client_fault;
                    cf.rule = rule.name;
                    co_await send_fault(cf, false, http10, rec);
                } else if (up_dog.expired()) {
                    {
                        // Named, not a temporary in the co_await: GCC 12 destroys those twice.
                        rules::fault fr = make_fault(fault_class::upstream_timeout, 504, "no answer from " + rec.target + " within " + std::to_string(to.timeouts.read.count() / 1000) + " s",
                                         rule.name);
                        co_await send_fault(fr,
                                        false, http10, rec);
                    }
                } else if (rec.upstream_conn != "pinned") {
                    {
                        // Named, not a temporary in the co_await: GCC 12 destroys those twice.
                        rules::fault fr = make_fault(fault_class::upstream_protocol, 502, "the upstream closed the connection without answering (" + ec.message() + ")", rule.name);
                        co_await send_fault(fr,
                                        false, http10, rec);
                    }
                }
                // A pinned upstream that went away takes the client with it: NTLM state is gone.
                co_return co_await finish(false, fate::close);
            }
            up->in.commit(n);
        }
        rec.status = resp.status;

        for (auto& fld : resp.fields)
            if (fld.id == http::field_id::www_authenticate && connection_auth(fld.value)) auth_on_connection = true;

        // ---- the response head toward the client ----
        bool chunk_to_client = resp.body == http::body_kind::chunked && !http10;
        bool close_delimited = resp.body == http::body_kind::until_close || (resp.body == http::body_kind::chunked && http10);
        if (close_delimited) close_client = true;
        if (!sig->done && resp.status >= 300) close_client = true;  // answered before the body ended
        if (w_.stopping) close_client = true;  // draining: this is the connection's last answer
        http::response_rewrite rrw;
        rrw.tier = rt_->name;
        rrw.request_method = method;
        rrw.http10 = http10;
        rrw.chunk_to_client = chunk_to_client;
        rrw.close_client = close_client;
        rrw.set_cookie = set_cookie_;
        std::string rh = http::write_response_head(resp, rrw);
        up->in.consume(resp.head_size);
        bool upstream_keep = resp.keep_alive;
        auto resp_body = resp.body;
        auto resp_length = resp.content_length;
        return_fields(resp.fields);  // the response head is done with
        {
            // The head, and as much of a length-framed body as already arrived with it, in
            // one write: a small response costs one send, not two.
            std::size_t first_body = 0;
            if (resp_body == http::body_kind::length)
                first_body = static_cast<std::size_t>(std::min<std::uint64_t>(up->in.size(), resp_length));
            std::array<asio::const_buffer, 2> bufs{asio::buffer(rh), asio::buffer(up->in.data().data(), first_body)};
            error_code ec;
            co_await down_.write(bufs, ec);
            rec.bytes_out += rh.size() + first_body;
            if (ec) co_return co_await finish(false, fate::close);
            up->in.consume(first_body);
            resp_length -= first_body;
        }

        // ---- the response body, flushed as it arrives ----
        pump_up_ = up;
        pump_sig_ = sig;
        bool body_ok = co_await pump_response(*up, up_dog, resp_body, resp_length, chunk_to_client, to.timeouts.read, rec);
        pump_up_.reset();
        pump_sig_.reset();
        up_dog.stop();
        if (!body_ok) co_return co_await finish(false, fate::close);

        // The request body normally ended before the response; if not, wait for it unless
        // the client connection closes anyway.
        if (!sig->done && !close_client) {
            error_code ec;
            co_await sig->timer.async_wait(redirect(ec));
        }
        bool reusable = upstream_keep && resp_body != http::body_kind::until_close;
        // Connection-bound authentication: the upstream belongs to this client from now on,
        // and when it closes, so does the client connection.
        if (auth_on_connection || rec.upstream_conn == "pinned") {
            if (!reusable) close_client = true;
            co_return co_await finish(!close_client, reusable ? fate::pin : fate::close);
        }
        co_return co_await finish(!close_client, reusable ? fate::pool : fate::close);
    }

    /// Starts watching the client once the answer has been pending for `watch_delay`: most
    /// answers come sooner, and then the watch (a client read to cancel) is not worth it.
    void watch_soon(const std::shared_ptr<upstream_conn>& up, const std::shared_ptr<pump_signal>& request) {
        if (watching_ || client_gone_ || !request->done || watch_later_.armed()) return;
        watch_up_ = up;
        watch_req_ = request;
        down_dog_.disarm();  // waiting for an answer is not client idleness
        watch_later_.arm(watch_delay);
    }
    void watch_now() {
        auto up = std::move(watch_up_);
        auto req = std::move(watch_req_);
        if (up && req) maybe_watch(up, *req);
    }

    /// Starts watching the client if the request is complete and no watch runs.
    void maybe_watch(const std::shared_ptr<upstream_conn>& up, const pump_signal& request) {
        if (watching_ || client_gone_ || !request.done) return;
        watching_ = true;
        down_dog_.arm(std::chrono::hours(24));  // waiting for an answer is not client idleness
        if (!in_.empty()) {
            spawn_watch(up);  // bytes in hand: read on after them
            return;
        }
        // The common shape, a held request with nothing more from the client: a one-byte
        // peek with a plain handler, no coroutine, no buffer (about 200 bytes while it
        // waits, where a watch coroutine and its signal cost a kilobyte).
        in_.release();
        watch_sig_.reset();
        auto gen = ++watch_gen_;
        down_.socket().async_receive(asio::buffer(&watch_peek_, 1), tcp::socket::message_peek,
                                     [self = shared_from_this(), up, gen](const error_code& ec, std::size_t) {
                                         if (gen != self->watch_gen_) return;  // stop_watch() gave it up
                                         if (ec) {
                                             self->watching_ = false;
                                             if (ec == asio::error::operation_aborted) return;
                                             self->client_gone_ = true;
                                             up->stream.close();  // whoever waits on the upstream wakes now
                                         } else if (self->down_.is_tls()) {
                                             // A TLS record: application data or the client's
                                             // close_notify. Only OpenSSL can tell.
                                             self->spawn_watch(up);
                                         } else {
                                             self->watching_ = false;  // a pipelined request waits its turn
                                         }
                                     });
    }

    void spawn_watch(const std::shared_ptr<upstream_conn>& up) {
        watch_sig_ = std::make_shared<pump_signal>(w_.io.get_executor());
        spawn_guarded(w_, "http client watch", [self = shared_from_this(), up, sig = watch_sig_]() { return self->watch(up, sig); });
    }

    task<> watch(std::shared_ptr<upstream_conn> up, std::shared_ptr<pump_signal> sig) {
        error_code ec;
        // A held request (an ActiveSync Ping) waits for its answer without a client buffer.
        if (in_.empty()) {
            in_.release();
            co_await down_.wait_readable(ec);
        }
        if (!ec) {
            std::size_t room = 0;
            char* p = in_.prepare(4096, room);
            auto n = co_await down_.read_some(asio::buffer(p, room), ec);
            if (!ec) in_.commit(n);  // a pipelined request: it waits its turn in the buffer
        }
        if (ec && ec != asio::error::operation_aborted) {
            client_gone_ = true;
            up->stream.close();  // whoever waits on the upstream wakes now
        }
        watching_ = false;
        sig->done = true;
        sig->timer.cancel();
    }

    task<> stop_watch() {
        watch_later_.disarm();
        watch_up_.reset();
        watch_req_.reset();
        if (!watching_) co_return;
        if (!watch_sig_) {
            // The peek: given up here, its handler ignores whatever it completes with.
            ++watch_gen_;
            watching_ = false;
            down_.cancel();
            co_return;
        }
        auto sig = watch_sig_;
        down_.cancel();
        error_code ec;
        while (!sig->done) co_await sig->timer.async_wait(redirect(ec));
    }

    task<bool> pump_response(upstream_conn& up, watchdog& dog, http::body_kind kind, std::uint64_t length, bool chunk_to_client,
                             std::chrono::milliseconds read_timeout, access_record& rec) {
        error_code ec;
        auto read_more = [&]() -> task<bool> {
            std::size_t room = 0;
            char* p = up.in.prepare(pump_chunk, room);
            dog.arm(read_timeout);
            if (pump_up_ && pump_sig_) watch_soon(pump_up_, pump_sig_);
            auto n = co_await up.stream.read_some(asio::buffer(p, std::min(room, pump_chunk)), ec);
            if (ec) co_return false;
            up.in.commit(n);
            co_return true;
        };
        if (kind == http::body_kind::none) co_return true;
        if (kind == http::body_kind::length || kind == http::body_kind::until_close) {
            std::uint64_t left = length;
            while (kind == http::body_kind::until_close || left > 0) {
                if (up.in.empty() && !co_await read_more()) co_return kind == http::body_kind::until_close && ec == asio::error::eof;
                auto data = up.in.data();
                if (kind == http::body_kind::length && data.size() > left) data = data.substr(0, static_cast<std::size_t>(left));
                co_await down_.write(asio::buffer(data.data(), data.size()), ec);
                if (ec) co_return false;
                rec.bytes_out += data.size();
                up.in.consume(data.size());
                left -= std::min<std::uint64_t>(left, data.size());
            }
            co_return true;
        }
        // chunked: decode, and re-encode each chunk as it arrives (MAPI's PENDING keep-alives)
        http::chunked_decoder dec;
        while (!dec.done()) {
            if (up.in.empty() && !co_await read_more()) co_return false;
            http::chunked_decoder::step st;
            http::parse_error perr;
            if (!dec.feed(up.in.data(), st, perr)) co_return false;
            if (!st.data.empty()) {
                if (chunk_to_client) {
                    auto size_line = hex(st.data.size()) + "\r\n";
                    std::array<asio::const_buffer, 3> bufs{asio::buffer(size_line), asio::buffer(st.data.data(), st.data.size()),
                                                           asio::buffer("\r\n", 2)};
                    co_await down_.write(bufs, ec);
                    rec.bytes_out += size_line.size() + st.data.size() + 2;
                } else {
                    co_await down_.write(asio::buffer(st.data.data(), st.data.size()), ec);
                    rec.bytes_out += st.data.size();
                }
                if (ec) co_return false;
            }
            up.in.consume(st.consumed);
        }
        if (chunk_to_client) {
            co_await down_.write(asio::buffer("0\r\n\r\n", 5), ec);
            rec.bytes_out += 5;
            if (ec) co_return false;
        }
        co_return true;
    }

    /// Client -> upstream body. Runs beside the response; signals when done.
    task<> pump_request(std::shared_ptr<upstream_conn> up, std::shared_ptr<pump_signal> sig, http::body_kind kind,
                        std::uint64_t length, std::chrono::milliseconds idle, std::uint64_t limit) {
        error_code ec;
        bool ok = true;
        auto read_more = [&]() -> task<bool> {
            std::size_t room = 0;
            char* p = in_.prepare(pump_chunk, room);
            down_dog_.arm(idle);
            auto n = co_await down_.read_some(asio::buffer(p, std::min(room, pump_chunk)), ec);
            if (ec) co_return false;
            in_.commit(n);
            co_return true;
        };
        if (kind == http::body_kind::length) {
            std::uint64_t left = length;
            // What arrived with the head goes first; then a large body between plain
            // connections moves through a pipe inside the kernel (an RPC_IN_DATA channel of
            // 1 GiB never enters this process).
            if (left > in_.size() + splice_min && !down_.is_tls() && !up->stream.is_tls()) {
                if (!in_.empty()) {
                    auto data = in_.data();
                    if (data.size() > left) data = data.substr(0, static_cast<std::size_t>(left));
                    co_await up->stream.write(asio::buffer(data.data(), data.size()), ec);
                    if (!ec) {
                        sig->bytes += data.size();
                        in_.consume(data.size());
                        left -= data.size();
                    }
                }
                net::splice_pipe pipe;
                in_.release();
                while (!ec && pipe.ok() && left > 0 && in_.empty()) {
                    down_dog_.arm(idle);
                    auto n = co_await pipe.fill(down_, static_cast<std::size_t>(std::min<std::uint64_t>(left, pipe.capacity())), ec);
                    if (ec) break;
                    co_await pipe.drain(up->stream, n, ec);
                    if (ec) break;
                    sig->bytes += n;
                    left -= n;
                }
                if (ec) ok = false;
            }
            while (ok && left > 0) {
                if (in_.empty() && !co_await read_more()) {
                    ok = false;  // the client stopped early (an RPC channel may): forward what came
                    break;
                }
                auto data = in_.data();
                if (data.size() > left) data = data.substr(0, static_cast<std::size_t>(left));
                co_await up->stream.write(asio::buffer(data.data(), data.size()), ec);
                if (ec) {
                    ok = false;
                    break;
                }
                sig->bytes += data.size();
                in_.consume(data.size());
                left -= data.size();
            }
        } else {
            http::chunked_decoder dec;
            while (!dec.done()) {
                if (in_.empty() && !co_await read_more()) {
                    ok = false;
                    break;
                }
                http::chunked_decoder::step st;
                http::parse_error perr;
                if (!dec.feed(in_.data(), st, perr)) {
                    ok = false;  // framing in doubt: nothing more goes upstream
                    sig->client_fault = make_fault(fault_class::bad_request, perr.status, perr.code + ": " + perr.detail, "");
                    break;
                }
                if (!st.data.empty()) {
                    if (limit && sig->bytes + st.data.size() > limit) {
                        ok = false;
                        sig->client_fault = make_fault(fault_class::bad_request, 413, "chunked request body exceeds the rule's limit of " + std::to_string(limit), "");
                        break;
                    }
                    auto size_line = hex(st.data.size()) + "\r\n";
                    std::array<asio::const_buffer, 3> bufs{asio::buffer(size_line), asio::buffer(st.data.data(), st.data.size()),
                                                           asio::buffer("\r\n", 2)};
                    co_await up->stream.write(bufs, ec);
                    if (ec) {
                        ok = false;
                        break;
                    }
                    sig->bytes += st.data.size();
                }
                in_.consume(st.consumed);
            }
            if (ok) {
                co_await up->stream.write(asio::buffer("0\r\n\r\n", 5), ec);
                ok = !ec;
            }
        }
        if (!ok) {
            // The upstream must not take a truncated body for a whole one. A client that
            // broke the framing loses the upstream connection at once; one that merely
            // stopped early (an RPC channel may) half-closes, so the upstream sees what came.
            if (up->stream.is_tls() || sig->client_fault) up->stream.close();
            else up->stream.shutdown_send();
        }
        sig->ok = ok;
        sig->done = true;
        sig->timer.cancel();
    }

    worker& w_;
    std::shared_ptr<const instance_runtime> rt_;
    const listener_runtime* l_;
    std::string endpoint_;  ///< the listening address that accepted this connection
    std::string counted_as_;  ///< the listener whose open-connection gauge counts this one
    stream down_;
    watchdog down_dog_;
    std::uint64_t id_;
    rules::ip_address peer_;
    std::string peer_text_;
    bool trusted_peer_ = false;  ///< the previous tier (trust_forwarded_from)
    std::string sni_;
    flat_buffer in_{4096};
    std::shared_ptr<upstream_conn> pinned_;
    std::string set_cookie_;  ///< a refreshed forms-session cookie for the next response
    // The client watcher: while this tier waits on the upstream with the request complete,
    // a read on the client notices it leaving (a phone dropping an ActiveSync Ping, Outlook
    // closing an RPC_OUT_DATA channel) and frees the upstream at once.
    bool watching_ = false;
    bool client_gone_ = false;
    bool idle_ = false;  ///< waiting for the next request (a drain closes the connection now)
    std::shared_ptr<upstream_conn> pump_up_;
    std::shared_ptr<pump_signal> pump_sig_;
    std::shared_ptr<pump_signal> watch_sig_;
    const rules::target* key_of_ = nullptr;  ///< the target `key_` and `target_text_` describe
    std::string key_, target_text_;
    struct later final : net::deadline {
        later(asio::io_context& io, http_session& s) : deadline(io), session(s) {}
        void fire() override { session.watch_now(); }
        http_session& session;
    };
    static constexpr std::chrono::milliseconds watch_delay{200};
    later watch_later_{w_.io, *this};
    struct park_timer final : net::deadline {
        park_timer(asio::io_context& io, http_session& s) : deadline(io), session(s) {}
        void fire() override {
            if (!session.idle_) return;
            session.parking_ = true;
            session.down_.cancel();
        }
        http_session& session;
    };
    park_timer park_later_{w_.io, *this};
    clock_type::time_point idle_since_{};
    bool parking_ = false;  ///< the idle wait was cancelled to park the connection
    bool parked_ = false;   ///< handed to the parking lot (which now counts it)
    /// The request forward() decided to relay, for run() to carry out.
    struct relay_plan {
        const rules::rule* rule = nullptr;
        const rules::target* to = nullptr;
        std::string head_out, method;
        http::body_kind body = http::body_kind::none;
        std::uint64_t content_length = 0;
        bool expect_continue = false, auth_on_connection = false, client_keep_alive = true, http10 = false;
        clock_type::time_point t0{};
        std::shared_ptr<upstream_conn> up;  ///< relay() sent the request on it
        std::shared_ptr<pump_signal> sig;   ///< the request body's pump
    };
    relay_plan plan_;
    bool relay_next_ = false, answer_next_ = false;
    std::optional<watchdog> up_dog_;  ///< the upstream read deadline while an answer is awaited
    access_record rec_;  ///< the current transaction's
    bool resumed_ = false;  ///< came back from the parking lot
    std::uint32_t served_ = 0;  ///< transactions this session object has run
    std::shared_ptr<upstream_conn> watch_up_;
    std::shared_ptr<pump_signal> watch_req_;
    std::uint64_t watch_gen_ = 0;  ///< the client watch's peek now running (see maybe_watch)
    char watch_peek_ = 0;
};

}  // namespace

void start_http_session(worker& w, std::shared_ptr<const instance_runtime> rt, const listener_runtime& l, std::string endpoint,
                        tcp::socket s) {
    std::make_shared<http_session>(w, std::move(rt), l, std::move(endpoint), std::move(s))->start();
}

void resume_http_session(worker& w, parked_connection&& c) {
    // Judged by the current snapshot, as a kept connection's next request is; gone if its
    // address no longer listens with the same protocol.
    auto* l = w.rt->bound_at(c.endpoint);
    if (!l || l->cfg->proto != c.proto || w.stopping) {
        w.parked.close(c);
        return;
    }
    tcp::socket s(w.io);
    error_code ec;
    s.assign(c.v6 ? tcp::v6() : tcp::v4(), c.fd, ec);
    if (ec) {
        w.parked.close(c);
        return;
    }
    c.fd = -1;  // the socket owns it now
    if (c.tls) s.non_blocking(true, ec);  // OpenSSL reads and writes the descriptor itself
    stream st = c.tls ? stream(std::move(s), std::move(c.tls)) : stream(std::move(s));
    std::make_shared<http_session>(w, w.rt, *l, std::move(c), std::move(st))->start();
}

}  // namespace dmz::proxy
