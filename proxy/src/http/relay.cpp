// A transaction the head phases allowed, toward the upstream and back: take an upstream
// connection (pinned, pooled or new), send the head and start the body's pump; then read
// the answer's head, send it on, pump its body, and finish (pin, pool or close; log).
#include "http/head_writer.hpp"
#include "http/session.hpp"

namespace dmz::proxy {

using namespace net;

std::string http_session::pool_key(const rules::target& to) {
    std::string k = endpoint_text(*to.address, to.port);
    if (to.source) k += "<" + to.source->to_string();
    if (to.tls) k += "|tls|" + to.name + "|" + to.ca_file;
    return k;
}

task<http_session::take> http_session::take_upstream(bool has_body, rules::fault& f) {
    const auto& to = *tx_.to;
    if (pinned_ && pinned_->key == key_) {
        tx_.up = std::move(pinned_);
        tx_.use = upstream_use::pinned;
        if (still_open(*tx_.up)) co_return take::ok;
        tx_.up->stream.close();
        tx_.rec.fault = make_fault(fault_class::upstream_connect, 0,
                                   "the pinned upstream connection closed; closing the client connection with it");
        co_return take::pinned_gone;
    }
    if ((tx_.up = w_.pool.take(key_, to.timeouts.idle, has_body))) {
        tx_.use = upstream_use::reused;
        co_return take::ok;
    }
    tx_.up = co_await connect_upstream(w_.io, w_.upstream_tls, to, key_, f, down_.faults());
    if (!tx_.up) co_return take::failed;
    tx_.use = upstream_use::fresh;
    co_return take::ok;
}

task<bool> http_session::relay() {
    next_ = stage::none;
    bool has_body = tx_.body != http::body_kind::none;
    bool sent = false;
    // A pooled connection the upstream closed meanwhile costs one more try.
    for (int attempt = 0; attempt < 2 && !sent; ++attempt) {
        rules::fault f;
        auto got = co_await take_upstream(has_body, f);
        if (got == take::pinned_gone) {
            log_transaction();
            co_return false;
        }
        if (got == take::failed) {
            f.rule = tx_.rule->name;
            auto out = refusal(f, tx_.client_keep_alive && !has_body, tx_.http10);
            co_return co_await send(out);
        }
        error_code ec;
        co_await tx_.up->stream.write(asio::buffer(tx_.head_out), ec);
        if (!ec) {
            sent = true;
            break;
        }
        tx_.up->stream.close();
        tx_.up.reset();
        if (tx_.use == upstream_use::pinned) {
            // The authenticated upstream is gone: the client connection goes too, so the
            // client starts its handshake again instead of landing on a stranger's socket.
            tx_.rec.fault = make_fault(fault_class::upstream_connect, 0, "the pinned upstream connection closed: " + ec.message());
            log_transaction();
            co_return false;
        }
        if (tx_.use == upstream_use::fresh || attempt == 1) {
            auto fr = make_fault(fault_class::upstream_connect, 502, "sending to the upstream failed: " + ec.message(), tx_.rule->name);
            auto out = refusal(fr, false, tx_.http10);
            co_return co_await send(out);
        }
    }
    tx_.up->requests++;
    std::string().swap(tx_.head_out);  // sent: not kept while the answer is awaited
    start_request_pump();
    // run() waits for the answer and then calls answer(): while the request is held
    // upstream, this frame is gone.
    next_ = stage::answer;
    co_return true;
}

void http_session::start_request_pump() {
    // The request body flows on its own while the response is read: an upstream may answer
    // (401, 413) before the body ends, and RPC channels stream for hours.
    tx_.sig = std::make_shared<pump_signal>(w_.io.get_executor());
    if (tx_.body == http::body_kind::none) {
        tx_.sig->done = tx_.sig->ok = true;
        return;
    }
    spawn_guarded(w_, "http request body pump",
                  [self = shared_from_this(), up = tx_.up, sig = tx_.sig, kind = tx_.body, length = tx_.content_length,
                   idle = tx_.to->timeouts.idle, limit = tx_.rule->max_body]() {
                      return self->pump_request(up, sig, kind, length, idle, limit);
                  });
}

task<> http_session::write_refusal(const rules::fault& f) {
    auto out = refusal(f, false, tx_.http10);  // named: GCC 12 destroys a temporary in co_await twice
    co_await write_reply(out);
}

task<bool> http_session::finish(bool keep_client, fate f) {
    auto& up = tx_.up;
    auto& sig = *tx_.sig;
    co_await stop_watch();
    if (client_gone_) {
        keep_client = false;
        f = fate::close;
        if (!tx_.rec.fault) tx_.rec.note = "the client closed the connection while its answer was pending";
    }
    if (!sig.done) {
        up->stream.close();
        down_.cancel();
        error_code ec;
        co_await sig.timer.async_wait(redirect(ec));
        keep_client = false;
        f = fate::close;
    }
    tx_.rec.bytes_in += sig.bytes;
    if (!sig.ok) f = fate::close, keep_client = false;
    if (f == fate::pin && keep_client) pinned_ = up;
    else if (f == fate::pool) w_.pool.put(up);
    else up->stream.close();
    log_transaction();
    co_return keep_client;
}

task<bool> http_session::read_response_head(http::response_head& resp, error_code wait_ec, bool waited) {
    auto& up = *tx_.up;
    http::parse_error perr;
    http::limits rl{8192, 64 * 1024, 200};
    while (true) {
        if (!up.in.empty()) {
            borrow_fields(resp.fields);  // only now: a held request waits without one
            auto r = http::parse_response(up.in.data(), tx_.method, rl, resp, perr);
            if (r == http::result::error) {
                auto fr = make_fault(fault_class::upstream_protocol, 502, perr.code + ": " + perr.detail, tx_.rule->name);
                co_await write_refusal(fr);
                co_return false;
            }
            if (r == http::result::done && resp.status == 101) {
                // No protocol switching through a publishing proxy.
                auto fr = make_fault(fault_class::upstream_protocol, 502, "the upstream switched protocols (101)", tx_.rule->name);
                co_await write_refusal(fr);
                co_return false;
            }
            if (r == http::result::done && resp.status >= 200) co_return true;
            if (r == http::result::done) {
                // 100 Continue goes on when the client asked for it; other 1xx are dropped.
                up.in.consume(resp.head_size);
                if (resp.status == 100 && tx_.expect_continue) {
                    static const std::string cont = "HTTP/1.1 100 Continue\r\n\r\n";
                    error_code ec;
                    co_await down_.write(asio::buffer(cont), ec);
                    tx_.rec.bytes_out += cont.size();
                }
                continue;
            }
        }
        error_code ec;
        if (waited) {
            ec = wait_ec;  // run()'s wait, its deadline included (not re-armed here)
            waited = false;
        } else {
            up_dog_->arm(tx_.to->timeouts.read);
            watch_soon(tx_.up, tx_.sig);
            // A held request (an ActiveSync Ping, an RPC channel) on a new connection waits
            // without a buffer; a pooled connection has its buffer already and reads at once.
            if (up.in.capacity() == 0) co_await up.stream.wait_readable(ec);
        }
        std::size_t n = 0;
        if (!ec) {
            std::size_t room = 0;
            char* p = up.in.prepare(4096, room);
            n = co_await up.stream.read_some(asio::buffer(p, room), ec);
        }
        if (ec) {
            co_await answer_upstream_failure(ec);
            co_return false;
        }
        up.in.commit(n);
    }
}

task<> http_session::answer_upstream_failure(error_code ec) {
    const auto& rule = tx_.rule->name;
    auto& sig = *tx_.sig;
    if (client_gone_) co_return;
    if (sig.done && sig.client_fault) {
        auto cf = *sig.client_fault;
        cf.rule = rule;
        co_await write_refusal(cf);
    } else if (sig.done && sig.client_stopped && !up_dog_->expired()) {
        // The client stopped in its request body, and the upstream then gave up on it: the
        // client's fault, not the upstream's.
        auto cf = make_fault(fault_class::bad_request, 400,
                             "the client stopped sending in the request body; the upstream closed without answering", rule);
        co_await write_refusal(cf);
    } else if (up_dog_->expired()) {
        auto fr = make_fault(fault_class::upstream_timeout, 504,
                             "no answer from " + tx_.rec.target + " within " + std::to_string(tx_.to->timeouts.read.count() / 1000) + " s",
                             rule);
        co_await write_refusal(fr);
    } else if (tx_.use != upstream_use::pinned) {
        auto fr = make_fault(fault_class::upstream_protocol, 502,
                             "the upstream closed the connection without answering (" + ec.message() + ")", rule);
        co_await write_refusal(fr);
    }
    // A pinned upstream that went away takes the client with it silently: NTLM state is gone.
}

task<bool> http_session::send_response_head(http::response_head& resp, bool& close_client, http::body_kind& body,
                                            std::uint64_t& length) {
    auto& up = *tx_.up;
    for (auto& fld : resp.fields)
        if (fld.id == http::field_id::www_authenticate && http::connection_auth(fld.value)) tx_.auth_on_connection = true;
    bool chunk_to_client = resp.body == http::body_kind::chunked && !tx_.http10;
    bool close_delimited = resp.body == http::body_kind::until_close || (resp.body == http::body_kind::chunked && tx_.http10);
    if (close_delimited) close_client = true;
    if (!tx_.sig->done && resp.status >= 300) close_client = true;  // answered before the body ended
    if (w_.stopping) close_client = true;                           // draining: this is the connection's last answer
    http::response_rewrite rrw;
    rrw.tier = rt_->name;
    rrw.request_method = tx_.method;
    rrw.http10 = tx_.http10;
    rrw.chunk_to_client = chunk_to_client;
    rrw.close_client = close_client;
    rrw.set_cookie = set_cookie_;
    std::string rh = http::write_response_head(resp, rrw);
    up.in.consume(resp.head_size);
    body = resp.body;
    length = resp.content_length;
    // The head, and as much of a length-framed body as already arrived with it, in one
    // write: a small response costs one send, not two.
    std::size_t first_body = 0;
    if (body == http::body_kind::length) first_body = static_cast<std::size_t>(std::min<std::uint64_t>(up.in.size(), length));
    std::array<asio::const_buffer, 2> bufs{asio::buffer(rh), asio::buffer(up.in.data().data(), first_body)};
    error_code ec;
    co_await down_.write(bufs, ec);
    if (ec) {
        client_write_failed(ec);
        co_return false;
    }
    tx_.rec.bytes_out += rh.size() + first_body;
    up.in.consume(first_body);
    length -= first_body;
    co_return true;
}

task<bool> http_session::answer(error_code wait_ec, bool waited) {
    bool close_client = !tx_.client_keep_alive;
    http::response_head resp;
    fields_loan loan{resp.fields};
    if (!co_await read_response_head(resp, wait_ec, waited)) co_return co_await finish(false, fate::close);
    tx_.rec.status = resp.status;
    bool upstream_keep = resp.keep_alive;
    bool chunk_to_client = resp.body == http::body_kind::chunked && !tx_.http10;
    auto body = http::body_kind::none;
    std::uint64_t length = 0;
    bool sent = co_await send_response_head(resp, close_client, body, length);
    return_fields(resp.fields);  // the response head is done with
    if (!sent) co_return co_await finish(false, fate::close);
    // The response body, flushed as it arrives.
    bool body_ok = co_await pump_response(body, length, chunk_to_client);
    up_dog_->stop();
    if (!body_ok) co_return co_await finish(false, fate::close);
    // The request body normally ended before the response; if not, wait for it unless the
    // client connection closes anyway.
    if (!tx_.sig->done && !close_client) {
        error_code ec;
        co_await tx_.sig->timer.async_wait(redirect(ec));
    }
    bool reusable = upstream_keep && body != http::body_kind::until_close;
    // Connection-bound authentication: the upstream belongs to this client from now on, and
    // when it closes, so does the client connection.
    if (tx_.auth_on_connection || tx_.use == upstream_use::pinned) {
        if (!reusable) close_client = true;
        co_return co_await finish(!close_client, reusable ? fate::pin : fate::close);
    }
    co_return co_await finish(!close_client, reusable ? fate::pool : fate::close);
}

}  // namespace dmz::proxy
