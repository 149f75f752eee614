// One request's head phases, in a fixed order over one context (admission, and tx_ for
// what outlives them): read head -> filter -> (forms pages) -> authenticate -> decide ->
// rewrite -> chunked probe. Each phase lets the request on (nullopt) or returns the reply
// that ends it; admit() runs them in order and hands an allowed request to run().
#include <cstring>

#include "dmz/rules/guards.hpp"
#include "dmz/rules/path.hpp"
#include "http/head_writer.hpp"
#include "http/session.hpp"

namespace dmz::proxy {

using namespace net;

access_record http_session::new_record() const {
    access_record r;
    r.instance = rt_->name;
    r.conn = id_;
    r.client = peer_text_;
    r.original_client = peer_text_;
    r.listener = lcfg().name;
    return r;
}

void http_session::log_transaction() {
    auto& rec = tx_.rec;
    rec.upstream_conn = to_string(tx_.use);
    rec.duration_ms = std::chrono::duration<double, std::milli>(clock_type::now() - tx_.t0).count();
    if (w_.stats.on) w_.stats.observe(rec, static_cast<std::int64_t>(w_.pool.idle_count()));
    w_.log.write(rec);
}

local_reply http_session::refusal(const rules::fault& f, bool keep, bool http10) {
    auto& rec = tx_.rec;
    rec.fault = f;
    if (rec.rule.empty()) rec.rule = f.rule;
    if (rec.action.empty()) rec.action = "deny";
    return {render_fault(f, rt_->name, rt_->role, keep, http10, lcfg().realm), f.status, keep};
}

task<bool> http_session::write_reply(const local_reply& r) {
    if (r.wire.empty()) co_return false;
    error_code ec;
    co_await down_.write(asio::buffer(r.wire), ec);
    tx_.rec.status = r.status;
    tx_.rec.bytes_out += r.wire.size();
    co_return r.keep && !ec;
}

task<bool> http_session::send(const local_reply& r) {
    bool keep = co_await write_reply(r);
    log_transaction();
    co_return keep;
}

task<bool> http_session::transaction(bool first, bool readable) {
    tx_.rec = new_record();
    tx_.t0 = clock_type::now();
    tx_.use = upstream_use::none;
    tx_.up_until_close = false;
    http::request_head head;
    fields_loan loan{head.fields};
    bool gone = false;
    reply r = co_await read_head(head, first, readable, gone);
    if (gone) co_return false;
    if (!r) r = co_await admit(head);
    if (r) co_return co_await send(*r);
    co_return true;
}

http::limits http_session::head_limits() const {
    http::limits hl{lcfg().limits.max_request_line, lcfg().limits.max_header_bytes, lcfg().limits.max_headers};
    if (trusted_peer_) {
        // A previous tier adds Via and the forwarding fields to what its own limits let
        // through: leave room for them, or the back-end refuses what the front-end took.
        hl.max_head_bytes += 8 * 1024;
        hl.max_fields += 16;
        hl.max_request_line += 1024;
    }
    return hl;
}

task<http_session::reply> http_session::read_head(http::request_head& head, bool first, bool readable, bool& gone) {
    auto hl = head_limits();
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
                tx_.rec.method = "-";
                co_return refusal(make_fault(fault_class::bad_request, perr.status, perr.code + ": " + perr.detail), false, false);
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
            if (!down_dog_.expired() || !got_bytes) {
                gone = true;  // the client left, or was idle too long: nothing to answer
                co_return std::nullopt;
            }
            tx_.rec.method = "-";
            co_return refusal(make_fault(fault_class::bad_request, 408,
                                         "request-timeout: the request head did not arrive within " +
                                             std::to_string(lcfg().timeouts.head.count() / 1000) + " s"),
                              false, false);
        }
        in_.commit(n);
        // Parse again only when a line may have ended (or the limit is reached): a head
        // sent a byte at a time must not cost a full parse per byte.
        parse_now = std::memchr(p, '\n', n) != nullptr || in_.size() > hl.max_head_bytes || std::memchr(p, '\0', n) != nullptr;
        if (!got_bytes) {
            got_bytes = true;
            tx_.t0 = clock_type::now();
            down_dog_.arm(lcfg().timeouts.head);
        }
    }
    tx_.rec.bytes_in = head.head_size;
    if (w_.stopping) head.keep_alive = false;  // draining: every answer now closes
    co_return std::nullopt;
}

task<http_session::reply> http_session::admit(http::request_head& head) {
    admission a;
    a.http10 = head.version_minor == 0;
    a.keep_if_refused = head.keep_alive && head.body == http::body_kind::none;
    a.host = http::host_without_port(head.host);
    a.forms = lcfg().auth == rules::auth_mode::forms && rt_->sessions;
    tx_.rec.method = std::string(head.method);
    tx_.rec.host = a.host;
    tx_.rec.path = std::string(head.target);
    set_cookie_.clear();
    reply r = filter(head, a);
    bool login = false;
    if (!r && a.forms && forms_page_path(head, login)) {
        // The page may read a form into the buffer the head lives in: copied out first.
        auto q = forms_request_of(head, login);
        in_.consume(head.head_size);
        co_return co_await forms_page(q, a);
    }
    if (!r) r = co_await authenticate(head, a);
    if (!r) r = decide(head, a);
    if (r) {
        in_.consume(head.head_size);
        co_return r;
    }
    rewrite(head, a);
    if (tx_.body == http::body_kind::chunked) r = co_await probe_chunked();
    if (!r) next_ = stage::relay;
    co_return r;
}

http_session::reply http_session::filter(const http::request_head& head, admission& a) {
    // The same instance in Via: the request went around (TMG 12206).
    for (auto& f : head.fields)
        if (f.id == http::field_id::via && http::via_names(f.value, rt_->name))
            return refusal(make_fault(fault_class::rule_denied, 508, "loop: the request already passed through " + rt_->name + " (TMG 12206)"),
                           a.keep_if_refused, a.http10);
    // The client: the peer, or what a trusted previous tier says it saw.
    a.client = peer_;
    if (trusted_peer_) {
        if (auto c = rules::ip_address::parse(http::last_forwarded_for(head))) a.client = *c;
    }
    tx_.rec.original_client = a.client == peer_ ? peer_text_ : a.client.to_string();
    if (!lcfg().redirect_to_https) return std::nullopt;
    std::string loc = "https://" + std::string(head.host) + std::string(head.target);
    tx_.rec.action = "redirect";
    return local_reply{"HTTP/1.1 301 Moved Permanently\r\nLocation: " + loc + "\r\nContent-Length: 0\r\n" +
                           (a.keep_if_refused ? "" : "Connection: close\r\n") + "\r\n",
                       301, a.keep_if_refused};
}

task<http_session::reply> http_session::authenticate(const http::request_head& head, admission& a) {
    if (a.forms) {
        auto value = http::cookie_value(head, lcfg().session.cookie);
        if (!value.empty()) {
            a.session_problem = check_session(value, a.session, &a.groups);
            a.have_session = a.session_problem.empty();
            if (a.have_session) a.user = a.session.user;
        }
    }
    // Basic and forms listeners validate Basic credentials themselves.
    a.validates = lcfg().auth == rules::auth_mode::basic || lcfg().auth == rules::auth_mode::forms;
    a.authorization = head.get(http::field_id::authorization);
    if (a.validates && http::starts_with_nocase(a.authorization, "basic ")) {
        a.user.clear();
        a.groups.clear();
        a.have_session = false;
        set_cookie_.clear();
        auto token = std::string(a.authorization.substr(6));
        while (!token.empty() && token.front() == ' ') token.erase(0, 1);
        auto decoded = base64_decode(token);
        auto colon = decoded ? decoded->find(':') : std::string::npos;
        std::string tried_user, why_refused;
        bool busy = false;
        if (colon != std::string::npos) {
            tried_user = decoded->substr(0, colon);
            auto password = decoded->substr(colon + 1);  // named values: the check is awaited
            std::string listener = lcfg().name;
            rules::lockout_policy policy = lcfg().lockout;
            auto r = co_await w_.auth.check(tried_user, password, listener, a.client, policy);
            if (r.ok) a.user = r.user, a.groups = r.groups;
            else why_refused = r.refusal;
            busy = r.overloaded;
        }
        if (a.user.empty()) {
            tx_.rec.user = tried_user;
            // The password checks' queue was full: 503 (retry), not 401.
            if (busy) co_return refusal(auth_overloaded_fault(tried_user), a.keep_if_refused, a.http10);
            // The log, the live view and /metrics name the rule the request was for: the one
            // that asks an anonymous request for a user.
            auto anonymous = rt_->policy->evaluate(l_->id, facts_of(head, a), {.trace = false});
            tx_.rec.rule = anonymous.rule_name;
            auto out = refusal(make_fault(fault_class::auth_failed, 401,
                                          "the credentials" + (tried_user.empty() ? std::string() : " for '" + tried_user + "'") +
                                              " were refused",
                                          anonymous.rule_name),
                               a.keep_if_refused, a.http10);
            // The client hears only "refused"; the log says why (no user enumeration).
            if (!why_refused.empty()) tx_.rec.fault.detail += " (" + why_refused + ")";
            co_return out;
        }
    }
    tx_.rec.user = a.user;
    co_return std::nullopt;
}

rules::facts http_session::facts_of(const http::request_head& head, const admission& a) const {
    rules::facts f;
    f.client = a.client;
    if (down_.is_tls()) f.sni = sni_;
    f.host = a.host;
    f.method = std::string(head.method);
    f.target = std::string(head.target);
    f.who = a.user.empty() ? rules::identity::anonymous : rules::identity::authenticated;
    f.user = a.user;
    f.groups = a.groups;
    return f;
}

http_session::reply http_session::decide(const http::request_head& head, admission& a) {
    auto& rec = tx_.rec;
    a.d = rt_->policy->evaluate(l_->id, facts_of(head, a), {.trace = false});
    const auto& d = a.d;
    rec.rule = d.rule_name;
    rec.path = d.path.safe() ? d.path.path + (d.path.query.empty() ? "" : "?" + d.path.query) : std::string(head.target);
    if (d.result != rules::verdict::allow) {
        // A browser on a forms listener gets the login page; clients that cannot do forms
        // (ActiveSync, Outlook, EWS) get the Basic challenge.
        if (a.forms && d.why == fault_class::auth_required && a.authorization.empty() &&
            (head.method == "GET" || head.method == "HEAD") && rules::contains_nocase(head.get("accept"), "text/html"))
            return login_redirect(head, a);
        auto fr = d.refusal();
        if (!d.path.safe()) fr.detail = "path refused (" + d.path.unsafe + "); " + fr.detail;
        return refusal(fr, a.keep_if_refused, a.http10);
    }
    const rules::rule& rule = *d.matched;
    tx_.rule = &rule;
    tx_.to = &*rule.to;
    rec.action = "allow";
    if (key_of_ != tx_.to) {  // the snapshot this session holds keeps the target where it is
        key_ = pool_key(*tx_.to);
        target_text_ = endpoint_text(*tx_.to->address, tx_.to->port);
        key_of_ = tx_.to;
    }
    rec.target = target_text_;
    // The Exchange template's guards on headers.
    rules::exchange_guard guard(rule, d.path);
    if (rule.exchange_guards) {
        for (auto& fld : head.fields) {
            if (fld.id == http::field_id::cookie) guard.cookie(fld.value);
            if (fld.id == http::field_id::x_rps_cat) guard.rps_cat_field();
        }
        if (auto refused = guard.refusal()) return refusal(*refused, a.keep_if_refused, a.http10);
    }
    a.strip_security_token = guard.strip_security_token();
    if (rule.max_body && head.body == http::body_kind::length && head.content_length > rule.max_body)
        return refusal(make_fault(fault_class::bad_request, 413,
                                  "request body of " + std::to_string(head.content_length) + " bytes exceeds the rule's limit of " +
                                      std::to_string(rule.max_body),
                                  rule.name),
                       false, a.http10);
    return std::nullopt;
}

void http_session::rewrite(http::request_head& head, const admission& a) {
    const auto& to = *tx_.to;
    auto deleg = tx_.rule->delegate.value_or(a.validates ? rules::delegation::basic : rules::delegation::pass_through);
    http::request_rewrite rw;
    rw.path = a.d.path.path;
    rw.query = a.d.path.query;
    rw.host = to.host_policy == rules::host_header::target && !to.name.empty() ? std::string_view(to.name) : head.host;
    rw.tier = rt_->name;
    rw.delegation = deleg;
    rw.validated_basic = a.validates;
    rw.session_replaces_authorization = a.have_session && deleg == rules::delegation::basic;
    if (rw.session_replaces_authorization && !a.session.password.empty())
        rw.session_authorization = "Basic " + base64_encode(a.session.user + ":" + a.session.password);
    rw.strip_security_token = a.strip_security_token;
    if (a.forms) rw.session_cookie = lcfg().session.cookie;
    rw.forwarded = to.client_policy == rules::client_address::forwarded;
    rw.client = tx_.rec.original_client;
    rw.client_v6 = !a.client.is_v4();
    rw.tls = down_.is_tls();
    tx_.auth_on_connection = false;
    tx_.head_out = http::write_request_head(head, rw, tx_.auth_on_connection);
    tx_.expect_continue = head.expect_continue;
    tx_.body = head.body;
    tx_.content_length = head.content_length;
    tx_.client_keep_alive = head.keep_alive;
    tx_.http10 = a.http10;
    tx_.method = std::string(head.method);
    in_.consume(head.head_size);  // the head's views end here
    return_fields(head.fields);
    // While the request waits upstream (an ActiveSync Ping for minutes) it holds no client
    // buffer (the parsed head goes with transaction()'s frame).
    if (in_.empty()) in_.release();
}

task<http_session::reply> http_session::probe_chunked() {
    // The commonest framing attack forwards nothing at all: the first size line is read
    // and checked before the head goes upstream.
    while (true) {
        http::chunked_decoder probe;
        http::parse_error err;
        auto avail = in_.data();
        while (!avail.empty() && !probe.past_first_size_line()) {
            http::chunked_decoder::step st;
            if (!probe.feed(avail, st, err))
                co_return refusal(make_fault(fault_class::bad_request, err.status, err.code + ": " + err.detail, tx_.rule->name), false,
                                  tx_.http10);
            avail.remove_prefix(st.consumed);
        }
        if (probe.past_first_size_line()) co_return std::nullopt;
        std::size_t room = 0;
        char* p = in_.prepare(4096, room);
        error_code ec;
        down_dog_.arm(lcfg().timeouts.head);
        auto n = co_await down_.read_some(asio::buffer(p, room), ec);
        if (ec) {
            tx_.rec.fault = make_fault(fault_class::bad_request, 0, "the client closed before the chunked body began");
            co_return local_reply{};  // nothing to write: logged, and the connection ends
        }
        in_.commit(n);
    }
}

}  // namespace dmz::proxy
