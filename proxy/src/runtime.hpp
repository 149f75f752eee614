#pragma once
// What the running instance shares across its worker threads (immutable) and what each
// worker owns alone (its io_context, upstream pool and client TLS contexts).
#include <atomic>
#include <exception>
#include <functional>
#include <mutex>
#include <unordered_map>
#include <memory>
#include <string>
#include <vector>

#include "access_log.hpp"
#include "auth/authenticator.hpp"
#include "auth/forms_cookie.hpp"
#include "metrics.hpp"
#include "dmz/rules/evaluate.hpp"
#include "net/asio.hpp"
#include "net/parking.hpp"
#include "net/tls.hpp"
#include "net/upstream.hpp"

namespace dmz::proxy {

struct listener_runtime {
    const rules::listener* cfg = nullptr;
    rules::listener_id id;  ///< resolved once per snapshot: what each evaluation names it by
    std::unique_ptr<server_tls> tls;  ///< https listeners
};

/// An immutable snapshot of the instance's configuration; sessions keep the one they
/// started with.
struct instance_runtime {
    std::shared_ptr<const rules::policy> policy;
    std::vector<std::unique_ptr<listener_runtime>> listeners;
    std::string name;
    std::string role;
    std::shared_ptr<const session_sealer> sessions;  ///< when a listener uses forms
    std::shared_ptr<revoked_sessions> revoked = std::make_shared<revoked_sessions>();
    std::unordered_map<std::string, const listener_runtime*> by_endpoint;  ///< "address:port" -> its listener
    const rules::instance_config& config() const { return policy->config(); }
    /// The listener bound at "address:port" in this snapshot, or null.
    const listener_runtime* bound_at(const std::string& endpoint) const {
        auto it = by_endpoint.find(endpoint);
        return it == by_endpoint.end() ? nullptr : it->second;
    }
};

/// Builds the snapshot of a policy: the listeners' TLS contexts and the forms-session key.
/// Throws (naming the listener and the file) when a certificate or key cannot be used.
/// `revoked`: the logouts of the snapshot it replaces (a logout stays one across reloads).
std::shared_ptr<const instance_runtime> make_runtime(std::shared_ptr<const rules::policy> policy,
                                                     std::shared_ptr<revoked_sessions> revoked);

struct worker;
/// HTTP connections alive in the process, parked ones included (a drain waits for them, up
/// to its timeout).
std::atomic<int>& http_sessions();
/// A parked connection's client sent its next request (or closed): a session again.
void resume_http_session(worker& w, parked_connection&& c);

struct worker {
    worker(unsigned i, access_log& l, auth_context a)
        : io(1), parked(io), log(l), index(i), auth(std::move(a)) {
        auth.count_into(&stats);
        parked.stats = &stats;
        parked.on_wake = [this](parked_connection&& c) { resume_http_session(*this, std::move(c)); };
        parked.on_close = [this](parked_connection& c) {
            http_sessions().fetch_sub(1, std::memory_order_relaxed);
            stats.connection(c.counted_as, -1);
        };
    }
    metrics stats;  ///< first: sessions destroyed with the io_context still count into it
    net::asio::io_context io;
    /// Keep-alive client connections idle for a while (after io: destroyed before it).
    parking_lot parked;
    client_tls upstream_tls;
    upstream_pool pool;
    access_log& log;
    unsigned index;
    authenticator auth;
    /// Sessions that want to say goodbye on shutdown (SMTP's 421), by connection id.
    std::unordered_map<std::uint64_t, std::function<void()>> shutdown_hooks;
    bool stopping = false;
    /// Tests only: makes the n-th stream operation of this worker's sessions fail (null in
    /// production: one branch per operation).
    net::fault_plan* faults = nullptr;
    /// The snapshot new connections and the next request of a kept connection get; a
    /// reload replaces it (posted to this worker's thread, so no lock).
    std::shared_ptr<const instance_runtime> rt;
};

std::uint64_t next_connection_id();

/// An exception escaped a coroutine of this worker (a bug: the data plane reports failures
/// as error codes and faults). Logged to standard error and counted as an `internal` fault;
/// the worker goes on.
void report_escaped(worker& w, const char* what, std::exception_ptr e) noexcept;

/// Runs a coroutine on the worker. No coroutine is detached silently: an exception that
/// escapes it reaches report_escaped().
template <class F>
void spawn_guarded(worker& w, const char* what, F&& f) {
    net::asio::co_spawn(w.io, std::forward<F>(f), [&w, what](std::exception_ptr e) {
        if (e) report_escaped(w, what, e);
    });
}

/// SMTP sessions alive in the process (shutdown waits for their 421, not longer).
std::atomic<int>& smtp_sessions();

void start_smtp_session(worker& w, std::shared_ptr<const instance_runtime> rt, const listener_runtime& l,
                        net::tcp::socket s);

/// `endpoint`: the listening "address:port" (after a reload the connection's next request
/// is judged by the listener the new snapshot binds there).
void start_http_session(worker& w, std::shared_ptr<const instance_runtime> rt, const listener_runtime& l, std::string endpoint,
                        net::tcp::socket s);

}  // namespace dmz::proxy
