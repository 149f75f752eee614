// The bodies: upstream -> client (flushed as it arrives; chunks re-encoded one by one, so
// MAPI's PENDING keep-alives reach Outlook at once) and client -> upstream (beside the
// response; identity bodies between plain sockets through a kernel pipe).
#include "http/head_writer.hpp"
#include "http/session.hpp"

namespace dmz::proxy {

using namespace net;

namespace {
constexpr std::size_t pump_chunk = 64 * 1024;
/// A plain request body longer than this (beyond what came with the head) is spliced.
constexpr std::uint64_t splice_min = 256 * 1024;
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

task<bool> http_session::read_upstream_more(error_code& ec) {
    auto& up = *tx_.up;
    std::size_t room = 0;
    char* p = up.in.prepare(pump_chunk, room);
    up_dog_->arm(tx_.to->timeouts.read);
    watch_soon(tx_.up, tx_.sig);
    auto n = co_await up.stream.read_some(asio::buffer(p, std::min(room, pump_chunk)), ec);
    if (ec == asio::error::eof && tx_.up_until_close) co_return false;  // the end of the body
    if (ec) {
        if (up_dog_->expired())
            fail_late(make_fault(fault_class::upstream_timeout, 0,
                                 "no more of the answer's body within " + std::to_string(tx_.to->timeouts.read.count() / 1000) + " s"));
        else
            fail_late(make_fault(fault_class::upstream_protocol, 0, "the upstream connection failed in the answer's body (" + ec.message() + ")"));
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
    auto& up = *tx_.up;
    error_code ec;
    bool until_close = kind == http::body_kind::until_close;
    tx_.up_until_close = until_close;
    std::uint64_t left = length;
    while (until_close || left > 0) {
        if (up.in.empty() && !co_await read_upstream_more(ec)) co_return until_close && ec == asio::error::eof;
        auto data = up.in.data();
        if (!until_close && data.size() > left) data = data.substr(0, static_cast<std::size_t>(left));
        co_await down_.write(asio::buffer(data.data(), data.size()), ec);
        if (ec) {
            client_write_failed(ec);
            co_return false;
        }
        tx_.rec.bytes_out += data.size();
        up.in.consume(data.size());
        left -= std::min<std::uint64_t>(left, data.size());
    }
    co_return true;
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
    error_code ec;
    std::uint64_t left = length;
    // A large body between plain connections moves through a pipe inside the kernel (an
    // RPC_IN_DATA channel of 1 GiB never enters this process).
    if (left > in_.size() + splice_min && !down_.is_tls() && !up.stream.is_tls() && !co_await splice_request(up, sig, left, idle, ec))
        co_return false;
    while (left > 0) {
        // The client may stop early (an RPC channel may): what came is forwarded.
        if (in_.empty() && !co_await read_client_more(sig, idle, ec)) co_return false;
        auto data = in_.data();
        if (data.size() > left) data = data.substr(0, static_cast<std::size_t>(left));
        co_await up.stream.write(asio::buffer(data.data(), data.size()), ec);
        if (ec) co_return false;
        sig.bytes += data.size();
        in_.consume(data.size());
        left -= data.size();
    }
    co_return true;
}

task<bool> http_session::splice_request(upstream_conn& up, pump_signal& sig, std::uint64_t& left, std::chrono::milliseconds idle,
                                        error_code& ec) {
    // What arrived with the head goes first.
    if (!in_.empty()) {
        auto data = in_.data();
        if (data.size() > left) data = data.substr(0, static_cast<std::size_t>(left));
        co_await up.stream.write(asio::buffer(data.data(), data.size()), ec);
        if (ec) co_return false;
        sig.bytes += data.size();
        in_.consume(data.size());
        left -= data.size();
    }
    net::splice_pipe pipe;
    in_.release();
    while (pipe.ok() && left > 0 && in_.empty()) {
        down_dog_.arm(idle);
        auto n = co_await pipe.fill(down_, static_cast<std::size_t>(std::min<std::uint64_t>(left, pipe.capacity())), ec);
        if (ec) {
            sig.client_stopped = true;
            co_return false;
        }
        co_await pipe.drain(up.stream, n, ec);
        if (ec) co_return false;
        sig.bytes += n;
        left -= n;
    }
    co_return true;  // the rest (if the pipe failed to open) goes through the buffer
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
