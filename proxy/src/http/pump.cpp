// The bodies: upstream -> client (flushed as it arrives; chunks re-encoded one by one, so
// MAPI's PENDING keep-alives reach Outlook at once) and client -> upstream (beside the
// response). Identity bodies go through net::pipe (a kernel pipe between plain sockets).
#include "http/head_writer.hpp"
#include "http/session.hpp"
#include "net/pipe.hpp"

namespace dmz::proxy {

using namespace net;

namespace {
constexpr std::size_t pump_chunk = 64 * 1024;
}  // namespace

// ---- upstream -> client ---------------------------------------------------------------

void http_session::fail_late(rules::fault f) {
    if (tx_.rec.fault || client_gone_) return;  // the first cause stays; a client gone has its note
    if (tx_.rule) f.rule = tx_.rule->name;
    tx_.rec.fault = std::move(f);
}

void http_session::client_write_failed(const error_code& ec) {
    fail_late(make_fault(fault_class::bad_request, 0, "the client connection failed while the answer was sent (" + ec.message() + ")"));
}

void http_session::upstream_body_failed(const error_code& ec) {
    if (up_dog_->expired())
        fail_late(make_fault(fault_class::upstream_timeout, 0,
                             "no more of the answer's body within " + std::to_string(tx_.to->timeouts.read.count() / 1000) + " s"));
    else
        fail_late(make_fault(fault_class::upstream_protocol, 0, "the upstream connection failed in the answer's body (" + ec.message() + ")"));
}

task<bool> http_session::read_upstream_more(error_code& ec) {
    auto& up = *tx_.up;
    std::size_t room = 0;
    char* p = up.in.prepare(pump_chunk, room);
    up_dog_->arm(tx_.to->timeouts.read);
    watch_soon(tx_.up, tx_.sig);
    auto n = co_await up.stream.read_some(asio::buffer(p, std::min(room, pump_chunk)), ec);
    if (ec == asio::error::eof && tx_.up_until_close) co_return false;  // the end of the body
    if (ec) {
        upstream_body_failed(ec);
        co_return false;
    }
    up.in.commit(n);
    co_return true;
}

task<bool> http_session::pump_response(http::body_kind kind, std::uint64_t length, bool chunk_to_client) {
    if (kind == http::body_kind::none) co_return true;
    if (kind == http::body_kind::chunked) co_return co_await pump_response_chunked(chunk_to_client);
    co_return co_await pump_response_raw(kind, length);
}

task<bool> http_session::pump_response_raw(http::body_kind kind, std::uint64_t length) {
    error_code ec;
    auto timeout = tx_.to->timeouts.read;
    bool until_close = kind == http::body_kind::until_close;
    tx_.up_until_close = until_close;
    net::pipe_leg leg{.from = tx_.up->stream,
                      .to = down_,
                      .pending = tx_.up->in,
                      .left = until_close ? net::until_eof : length,
                      .moved = tx_.rec.bytes_out,
                      .before_read = [this, timeout] {
                          up_dog_->arm(timeout);
                          watch_soon(tx_.up, tx_.sig);
                      }};
    if (co_await net::pipe(leg, ec)) co_return true;
    if (leg.to_failed) client_write_failed(ec);
    else upstream_body_failed(ec);
    co_return false;
}

task<bool> http_session::pump_response_chunked(bool chunk_to_client) {
    auto& up = *tx_.up;
    error_code ec;
    http::chunked_decoder dec;
    while (!dec.done()) {
        if (up.in.empty() && !co_await read_upstream_more(ec)) co_return false;
        http::chunked_decoder::step st;
        http::parse_error perr;
        if (!dec.feed(up.in.data(), st, perr)) {
            fail_late(make_fault(fault_class::upstream_protocol, 0, "the answer's chunked body: " + perr.code + ": " + perr.detail));
            co_return false;
        }
        if (!st.data.empty()) {
            if (chunk_to_client) {
                auto size_line = http::hex(st.data.size()) + "\r\n";
                std::array<asio::const_buffer, 3> bufs{asio::buffer(size_line), asio::buffer(st.data.data(), st.data.size()),
                                                       asio::buffer("\r\n", 2)};
                co_await down_.write(bufs, ec);
                tx_.rec.bytes_out += size_line.size() + st.data.size() + 2;
            } else {
                co_await down_.write(asio::buffer(st.data.data(), st.data.size()), ec);
                tx_.rec.bytes_out += st.data.size();
            }
            if (ec) {
                client_write_failed(ec);
                co_return false;
            }
        }
        up.in.consume(st.consumed);
    }
    if (!chunk_to_client) co_return true;
    co_await down_.write(asio::buffer("0\r\n\r\n", 5), ec);
    tx_.rec.bytes_out += 5;
    if (ec) client_write_failed(ec);
    co_return !ec;
}

// ---- client -> upstream ---------------------------------------------------------------

task<bool> http_session::read_client_more(pump_signal& sig, std::chrono::milliseconds idle, error_code& ec) {
    std::size_t room = 0;
    char* p = in_.prepare(pump_chunk, room);
    down_dog_.arm(idle);
    auto n = co_await down_.read_some(asio::buffer(p, std::min(room, pump_chunk)), ec);
    if (ec) {
        sig.client_stopped = true;
        co_return false;
    }
    in_.commit(n);
    co_return true;
}

task<> http_session::pump_request(std::shared_ptr<upstream_conn> up, std::shared_ptr<pump_signal> sig, http::body_kind kind,
                                  std::uint64_t length, std::chrono::milliseconds idle, std::uint64_t limit) {
    bool ok = kind == http::body_kind::length ? co_await pump_request_length(*up, *sig, length, idle)
                                              : co_await pump_request_chunked(*up, *sig, idle, limit);
    if (!ok) {
        // The upstream must not take a truncated body for a whole one. A client that broke
        // the framing loses the upstream connection at once; one that merely stopped early
        // (an RPC channel may) half-closes, so the upstream sees what came.
        if (up->stream.is_tls() || sig->client_fault) up->stream.close();
        else up->stream.shutdown_send();
    }
    sig->ok = ok;
    sig->done = true;
    sig->timer.cancel();
}

task<bool> http_session::pump_request_length(upstream_conn& up, pump_signal& sig, std::uint64_t length,
                                             std::chrono::milliseconds idle) {
    // The client may stop early (an RPC channel may): what came is forwarded. A large body
    // between plain connections moves inside the kernel (an RPC_IN_DATA channel of 1 GiB
    // never enters this process).
    error_code ec;
    net::pipe_leg leg{.from = down_, .to = up.stream, .pending = in_, .left = length, .moved = sig.bytes,
                      .before_read = [this, idle] { down_dog_.arm(idle); }};
    if (co_await net::pipe(leg, ec)) co_return true;
    if (!leg.to_failed) sig.client_stopped = true;
    co_return false;
}

task<bool> http_session::pump_request_chunked(upstream_conn& up, pump_signal& sig, std::chrono::milliseconds idle,
                                              std::uint64_t limit) {
    error_code ec;
    http::chunked_decoder dec;
    while (!dec.done()) {
        if (in_.empty() && !co_await read_client_more(sig, idle, ec)) co_return false;
        http::chunked_decoder::step st;
        http::parse_error perr;
        if (!dec.feed(in_.data(), st, perr)) {
            // Framing in doubt: nothing more goes upstream.
            sig.client_fault = make_fault(fault_class::bad_request, perr.status, perr.code + ": " + perr.detail);
            co_return false;
        }
        if (!st.data.empty()) {
            if (limit && sig.bytes + st.data.size() > limit) {
                sig.client_fault = make_fault(fault_class::bad_request, 413,
                                              "chunked request body exceeds the rule's limit of " + std::to_string(limit));
                co_return false;
            }
            auto size_line = http::hex(st.data.size()) + "\r\n";
            std::array<asio::const_buffer, 3> bufs{asio::buffer(size_line), asio::buffer(st.data.data(), st.data.size()),
                                                   asio::buffer("\r\n", 2)};
            co_await up.stream.write(bufs, ec);
            if (ec) co_return false;
            sig.bytes += st.data.size();
        }
        in_.consume(st.consumed);
    }
    co_await up.stream.write(asio::buffer("0\r\n\r\n", 5), ec);
    co_return !ec;
}

}  // namespace dmz::proxy
