// The connection loop of an HTTP session: TLS handshake, one transaction after another on a
// kept connection, parking while idle, drain, and the client watch while an answer is pending.
#include <unistd.h>

#include "http/session.hpp"

namespace dmz::proxy {

using namespace net;

namespace {
std::vector<std::vector<http::field>>& spare_fields() {
    thread_local std::vector<std::vector<http::field>> spares;
    return spares;
}

stream make_stream(tcp::socket s, const listener_runtime& l) {
    if (l.tls) return stream(std::move(s), l.tls->default_context());
    return stream(std::move(s));
}
}  // namespace

void borrow_fields(std::vector<http::field>& f) {
    auto& spares = spare_fields();
    if (f.capacity() == 0 && !spares.empty()) {
        f = std::move(spares.back());
        spares.pop_back();
    }
}

void return_fields(std::vector<http::field>& f) {
    auto& spares = spare_fields();
    if (f.capacity() != 0 && spares.size() < 64) {
        f.clear();
        spares.push_back(std::move(f));
    }
    std::vector<http::field>().swap(f);
}

const char* to_string(upstream_use u) {
    switch (u) {
    case upstream_use::none: return "";
    case upstream_use::fresh: return "new";
    case upstream_use::reused: return "reused";
    case upstream_use::pinned: return "pinned";
    }
    return "?";
}

http_session::http_session(worker& w, std::shared_ptr<const instance_runtime> rt, const listener_runtime& l,
                           std::string endpoint, tcp::socket s)
    : w_(w), rt_(std::move(rt)), l_(&l), endpoint_(std::move(endpoint)), down_(make_stream(std::move(s), l)),
      down_dog_(w.io, down_), id_(next_connection_id()) {
    error_code ec;
    auto ep = down_.socket().remote_endpoint(ec);
    auto a = rules::ip_address::parse(ep.address().to_string());
    if (a) peer_ = *a;
    peer_text_ = peer_.to_string();
    down_.socket().set_option(tcp::no_delay(true), ec);
    down_.set_faults(w.faults);
    trusted_peer_ = rt_->policy->trusts_forwarding_from(peer_);
}

http_session::http_session(worker& w, std::shared_ptr<const instance_runtime> rt, const listener_runtime& l,
                           parked_connection&& c, stream s)
    : w_(w), rt_(std::move(rt)), l_(&l), endpoint_(std::move(c.endpoint)), counted_as_(std::move(c.counted_as)),
      down_(std::move(s)), down_dog_(w.io, down_), id_(c.id), peer_(c.peer), resumed_(true) {
    peer_text_ = peer_.to_string();
    down_.set_faults(w.faults);
    trusted_peer_ = rt_->policy->trusts_forwarding_from(peer_);
    if (down_.is_tls()) sni_ = server_name(down_.native_tls());
}

http_session::~http_session() {
    if (parked_) return;  // the parked record counts this connection now
    http_sessions().fetch_sub(1, std::memory_order_relaxed);
    w_.stats.connection(counted_as_, -1);
}

void http_session::start() {
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

void http_session::drain() {
    if (idle_) down_.cancel();
}

/// Between two requests: a reload happened, so the next request is judged by the new
/// snapshot (a keep-alive connection between the tiers may last for hours). False when
/// this address is no longer a listener of the same protocol: the connection closes.
bool http_session::adopt(std::shared_ptr<const instance_runtime> next) {
    auto* l = next->bound_at(endpoint_);
    if (!l || l->cfg->proto != l_->cfg->proto) return false;
    rt_ = std::move(next);
    l_ = l;
    key_of_ = nullptr;
    trusted_peer_ = rt_->policy->trusts_forwarding_from(peer_);
    return true;
}

task<> http_session::run() {
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
            bool parked = false;
            if (!co_await await_request(first, readable, parked)) {
                if (parked) co_return;  // the lot has the connection; this session ends
                break;
            }
        }
        if (w_.rt != rt_ && !adopt(w_.rt)) break;  // reloaded while this connection idled
        bool keep = co_await transaction(first, readable);
        ++served_;
        if (next_ == stage::relay) keep = co_await relay();
        if (next_ == stage::answer) {
            error_code wait_ec;
            bool waited = false;
            up_dog_.emplace(w_.io, tx_.up->stream);
            if (tx_.up->in.capacity() == 0) {
                // The request is held upstream (an ActiveSync Ping, for minutes) with only
                // this frame: relay()'s is gone and answer()'s not yet made.
                up_dog_->arm(tx_.to->timeouts.read);
                watch_soon(tx_.up, tx_.sig);
                co_await tx_.up->stream.wait_readable(wait_ec);
                waited = true;
            }
            keep = co_await answer(wait_ec, waited);
            up_dog_.reset();
            tx_.up.reset();
            tx_.sig.reset();
        }
        next_ = stage::none;
        watch_later_.disarm();
        if (!keep) break;
        first = false;
    }
    down_dog_.stop();
    if (pinned_) pinned_->stream.close();
    down_.close();
    w_.shutdown_hooks.erase(id_);
}

task<bool> http_session::await_request(bool first, bool& readable, bool& parked) {
    error_code ec;
    in_.release();
    bool may_park = !first && !pinned_ && !w_.stopping && !(down_.is_tls() && SSL_has_pending(down_.native_tls()));
    if (may_park) {
        idle_since_ = clock_type::now();
        // A new connection after its first request, with many sessions idle already (a
        // burst of phones connecting): park at once, so a burst never piles up as sessions.
        // Busy connections, and ones woken from the lot, wait park_after first, so they do
        // not park and wake per request.
        if (served_ == 1 && !resumed_ && w_.parked.waiting >= parking_lot::hot_sessions) {
            parked = park();
            co_return false;
        }
        park_later_.arm(parking_lot::park_after);
    }
    down_dog_.arm(first ? lcfg().timeouts.head : lcfg().timeouts.idle);
    idle_ = true;
    // Plain, and few sessions waiting: read straight into a (recycled) buffer, one system
    // call where a readiness peek and then the read cost two. With many waiting (a burst
    // of new connections, or thousands of clients), the wait holds no buffer until it
    // parks. TLS: OpenSSL reads the descriptor.
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
        parked = park();
        co_return false;
    }
    parking_ = false;
    if (ec || (w_.stopping && !first)) co_return false;
    readable = true;
    co_return true;
}

/// Hands the idle connection to the worker's parking lot. False: it could not be parked
/// (the socket is then closed by the caller's normal end).
bool http_session::park() {
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

// ---- the client watch --------------------------------------------------------------------

/// Starts watching the client once the answer has been pending for `watch_delay`: most
/// answers come sooner, and then the watch (a client read to cancel) is not worth it.
void http_session::watch_soon(const std::shared_ptr<upstream_conn>& up, const std::shared_ptr<pump_signal>& request) {
    if (watching_ || client_gone_ || !request->done || watch_later_.armed()) return;
    watch_up_ = up;
    watch_req_ = request;
    down_dog_.disarm();  // waiting for an answer is not client idleness
    watch_later_.arm(watch_delay);
}

void http_session::watch_now() {
    auto up = std::move(watch_up_);
    auto req = std::move(watch_req_);
    if (up && req) maybe_watch(up, *req);
}

/// Starts watching the client if the request is complete and no watch runs.
void http_session::maybe_watch(const std::shared_ptr<upstream_conn>& up, const pump_signal& request) {
    if (watching_ || client_gone_ || !request.done) return;
    watching_ = true;
    down_dog_.arm(std::chrono::hours(24));  // waiting for an answer is not client idleness
    if (!in_.empty()) {
        spawn_watch(up);  // bytes in hand: read on after them
        return;
    }
    // The common shape, a held request with nothing more from the client: a one-byte peek
    // with a plain handler, no coroutine, no buffer (about 200 bytes while it waits, where a
    // watch coroutine and its signal cost a kilobyte).
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

void http_session::spawn_watch(const std::shared_ptr<upstream_conn>& up) {
    watch_sig_ = std::make_shared<pump_signal>(w_.io.get_executor());
    spawn_guarded(w_, "http client watch", [self = shared_from_this(), up, sig = watch_sig_]() { return self->watch(up, sig); });
}

task<> http_session::watch(std::shared_ptr<upstream_conn> up, std::shared_ptr<pump_signal> sig) {
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

task<> http_session::stop_watch() {
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
