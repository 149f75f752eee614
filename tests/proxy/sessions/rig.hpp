#pragma once
// The session tests' rig: one worker (its io_context runs on the test's thread), a config
// written by the test, the session started on an accepted loopback socket, and both peers
// scripted here with plain Asio (never net::stream, so the worker's fault plan counts only
// the session's own operations): a client, and a fake upstream behind a second acceptor.
#include <gtest/gtest.h>

#include <dirent.h>

#include <csignal>

#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "dmz/certs/certs.hpp"
#include "dmz/rules/config.hpp"
#include "runtime.hpp"

namespace dmz::test::sessions {

namespace net = dmz::net;
namespace asio = net::asio;
namespace ssl = net::ssl;
using tcp = net::tcp;
using error_code = net::error_code;
template <class T = void>
using task = net::task<T>;

/// A CA and a certificate for mail.contoso.com and 127.0.0.1, made once per test binary.
struct pki {
    std::string dir, ca, cert, key;
    static const pki& get() {
        static const pki p = [] {
            pki x;
            auto base = std::filesystem::temp_directory_path() / ("dmz-session-tests-" + std::to_string(::getpid()));
            std::filesystem::create_directories(base);
            x.dir = base.string();
            auto authority = certs::open_or_make_ca(x.dir, "session tests CA");
            auto leaf = certs::issue_leaf(authority, {"mail.contoso.com", "127.0.0.1"}, x.dir, "mail");
            x.ca = authority.cert_file();
            x.cert = leaf.cert_file;
            x.key = leaf.key_file;
            return x;
        }();
        return p;
    }
    ~pki() {
        std::error_code ec;
        if (!dir.empty()) std::filesystem::remove_all(dir, ec);
    }
};

/// Open descriptors of this process (a leaked connection keeps its socket open).
inline int open_fds() {
    int n = 0;
    if (DIR* d = ::opendir("/proc/self/fd")) {
        while (::readdir(d)) ++n;
        ::closedir(d);
    }
    return n;
}

/// One end of a scripted peer: a socket, TLS on it once asked for, and what it read.
struct peer {
    explicit peer(tcp::socket s) : sock(std::move(s)) {}
    tcp::socket sock;
    std::optional<ssl::stream<tcp::socket>> tls;
    std::string in;
    bool ended = false;

    tcp::socket& raw() { return tls ? tls->next_layer() : sock; }
    task<bool> handshake(ssl::context& ctx, ssl::stream_base::handshake_type t) {
        tls.emplace(std::move(sock), ctx);
        error_code ec;
        co_await tls->async_handshake(t, net::redirect(ec));
        co_return !ec;
    }
    // Plain statements around each co_await: GCC 12 miscompiles some in conditions and
    // conditional expressions.
    task<bool> write(std::string_view s) {
        error_code ec;
        auto b = asio::buffer(s.data(), s.size());
        if (tls) {
            co_await asio::async_write(*tls, b, net::redirect(ec));
        } else {
            co_await asio::async_write(sock, b, net::redirect(ec));
        }
        co_return !ec;
    }
    /// False once the connection ended, without reading again: a second read after the end
    /// was seen to wait forever here (Asio 1.18; not investigated further).
    task<bool> read_more() {
        if (ended) co_return false;
        std::array<char, 4096> buf;
        error_code ec;
        std::size_t n = 0;
        if (tls) {
            n = co_await tls->async_read_some(asio::buffer(buf), net::redirect(ec));
        } else {
            n = co_await sock.async_read_some(asio::buffer(buf), net::redirect(ec));
        }
        if (ec) {
            ended = true;
            co_return false;
        }
        in.append(buf.data(), n);
        co_return true;
    }
    /// Reads until `delim` is in `in` (true) or the connection ends (false).
    task<bool> read_until(std::string_view delim) {
        while (in.find(delim) == std::string::npos) {
            bool more = co_await read_more();
            if (!more) co_return false;
        }
        co_return true;
    }
    task<> read_to_end() {
        bool more = true;
        while (more) more = co_await read_more();
    }
    void close() {
        error_code ec;
        raw().shutdown(tcp::socket::shutdown_both, ec);
        raw().close(ec);
    }
};

inline ssl::context server_context() {
    ssl::context c(ssl::context::tls_server);
    c.use_certificate_chain_file(pki::get().cert);
    c.use_private_key_file(pki::get().key, ssl::context::pem);
    return c;
}

inline ssl::context client_context() {
    ssl::context c(ssl::context::tls_client);
    c.set_verify_mode(ssl::verify_none);
    return c;
}

/// The access-log records, parsed.
inline std::vector<nlohmann::json> records(const proxy::access_log& log) {
    std::vector<nlohmann::json> out;
    for (auto& line : log.recent(0).second) out.push_back(nlohmann::json::parse(line));
    return out;
}

/// A worker, its snapshot from `config`, the listening socket the test accepts on, and
/// the fake upstream's acceptor. Configs name the ports as {FRONT} and {ORIGIN}.
class rig {
public:
    explicit rig(std::string config) {
        // As `dmzproxy run` does: OpenSSL writes to the socket itself, and a peer that
        // closed must cost an EPIPE, not the process.
        std::signal(SIGPIPE, SIG_IGN);
        log_.keep_recent(100);
        w_ = std::make_unique<proxy::worker>(0, log_, proxy::auth_context{});
        w_->stats.on = true;
        tcp::endpoint any(asio::ip::make_address("127.0.0.1"), 0);
        front_.emplace(w_->io, any);
        origin_.emplace(w_->io, any);
        replace(config, "{FRONT}", std::to_string(front_->local_endpoint().port()));
        replace(config, "{ORIGIN}", std::to_string(origin_->local_endpoint().port()));
        replace(config, "{CERT}", pki::get().cert);
        replace(config, "{KEY}", pki::get().key);
        replace(config, "{CA}", pki::get().ca);
        auto r = rules::load_instance_config_text(config, "session-test.toml");
        for (auto& d : r.diags)
            if (d.level == rules::severity::error) ADD_FAILURE() << d.code << " " << d.message << "\n" << config;
        if (!r.config) throw std::runtime_error("the test's config does not load");
        rt_ = proxy::make_runtime(std::make_shared<rules::policy>(std::move(*r.config)), nullptr);
        w_->rt = rt_;
        endpoint_ = "127.0.0.1:" + std::to_string(front_->local_endpoint().port());
    }

    proxy::worker& worker() { return *w_; }
    proxy::access_log& log() { return log_; }
    tcp::endpoint front() const { return front_->local_endpoint(); }
    tcp::acceptor& origin() { return *origin_; }

    /// Runs a scripted peer; an exception in it fails the test.
    template <class F>
    void spawn(F&& f) {
        asio::co_spawn(w_->io, std::forward<F>(f), [this](std::exception_ptr e) {
            if (!e) return;
            try {
                std::rethrow_exception(e);
            } catch (const std::exception& x) {
                peer_errors_ += std::string(x.what()) + "\n";
            }
        });
    }

    /// Accepts one connection and hands it to a session of the config's first listener.
    void serve_one() {
        spawn([this]() -> task<> {
            tcp::socket s(w_->io);
            error_code ec;
            co_await front_->async_accept(s, net::redirect(ec));
            if (ec) co_return;
            auto& l = *rt_->listeners.front();
            if (l.cfg->proto == rules::protocol::smtp) proxy::start_smtp_session(*w_, rt_, l, std::move(s));
            else proxy::start_http_session(*w_, rt_, l, endpoint_, std::move(s));
        });
    }

    /// No more connections either way (the client is done).
    void close_acceptors() {
        error_code ec;
        front_->close(ec);
        origin_->close(ec);
    }

    /// Runs the worker until it runs out of work; false when it still has work after
    /// `bound` (a hang).
    bool run(std::chrono::milliseconds bound = std::chrono::seconds(10)) {
        w_->io.run_for(bound);
        return w_->io.stopped();
    }

    const std::string& peer_errors() const { return peer_errors_; }

private:
    static void replace(std::string& s, const std::string& from, const std::string& to) {
        for (auto p = s.find(from); p != std::string::npos; p = s.find(from, p + to.size())) s.replace(p, from.size(), to);
    }
    proxy::access_log log_{""};
    std::unique_ptr<proxy::worker> w_;
    std::optional<tcp::acceptor> front_, origin_;
    std::shared_ptr<const proxy::instance_runtime> rt_;
    std::string endpoint_;
    std::string peer_errors_;
};

/// What every session test reads after a run, whatever the protocol: the access log, the
/// open-connection gauge, exceptions that escaped, and what the scripted peers saw go wrong.
struct aftermath {
    std::vector<nlohmann::json> recs;
    std::int64_t open_connections = 0;
    std::uint64_t internal_faults = 0;
    std::string peer_errors;
};

inline aftermath collect(rig& r) {
    aftermath a;
    a.recs = records(r.log());
    auto c = r.worker().stats.snapshot();
    for (auto& [listener, n] : c.active) a.open_connections += n;
    for (auto& [key, n] : c.faults)
        if (std::get<1>(key) == rules::fault_class::internal) a.internal_faults += n;
    a.peer_errors = r.peer_errors();
    return a;
}

}  // namespace dmz::test::sessions
