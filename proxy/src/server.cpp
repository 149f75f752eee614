#include <csignal>
#include <iostream>
#include <thread>

#include "dmz/proxy/run.hpp"
#include "runtime.hpp"

#include <openssl/sha.h>
#include <sys/stat.h>

namespace dmz::proxy {

using namespace net;

std::string lockout_table::refused(const std::string& listener, const std::string& user, const std::string& address,
                                   const rules::lockout_policy& p) {
    auto now = std::chrono::steady_clock::now();
    std::lock_guard lock(m_);
    if (p.address_threshold) {
        auto it = addresses_.find(listener + '\0' + address);
        if (it != addresses_.end() && it->second.count >= p.address_threshold && now - it->second.last < p.window)
            return "too many failures from " + address;
    }
    if (p.threshold) {
        auto it = users_.find(listener + '\0' + user);
        if (it != users_.end() && it->second.count >= p.threshold && now - it->second.last < p.window) return "locked out";
    }
    return "";
}

void lockout_table::failed(const std::string& listener, const std::string& user, const std::string& address,
                           const rules::lockout_policy& p) {
    auto now = std::chrono::steady_clock::now();
    std::lock_guard lock(m_);
    if (users_.size() > 100000) users_.clear();  // bounded, whatever an attacker sends
    if (addresses_.size() > 100000) addresses_.clear();
    entries_.store(users_.size() + addresses_.size(), std::memory_order_relaxed);
    for (auto* e : {&users_[listener + '\0' + user], &addresses_[listener + '\0' + address]}) {
        if (now - e->last >= p.window) e->count = 0;  // a new observation window
        ++e->count;
        e->last = now;
    }
}

void lockout_table::succeeded(const std::string& listener, const std::string& user) {
    std::lock_guard lock(m_);
    users_.erase(listener + '\0' + user);
    entries_.store(users_.size() + addresses_.size(), std::memory_order_relaxed);
}

authenticator::result authenticator::check(const std::string& user, const std::string& password, const std::string& listener,
                                           const std::string& address, const rules::lockout_policy& policy) {
    refresh();
    result r;
    if (!store_) {
        r.refusal = "no user store";
        return r;
    }
    std::string key = user + ":" + password;
    unsigned char digest[SHA256_DIGEST_LENGTH];
    SHA256(reinterpret_cast<const unsigned char*>(key.data()), key.size(), digest);
    std::string k(reinterpret_cast<char*>(digest), sizeof digest);
    auto now = std::chrono::steady_clock::now();
    auto it = cache_.find(k);
    bool cached = it != cache_.end() && it->second > now;
    bool ok = cached;
    if (cached && lockout_ && lockout_->any()) {
        // A locked-out user is refused even with a password that worked a minute ago:
        // otherwise guessing could go on past the lockout once the right one was cached.
        r.refusal = lockout_->refused(listener, user, address, policy);
        ok = r.refusal.empty();
    }
    if (!ok && !cached) {
        // A locked-out user gets the same answer, after the same work, as a wrong password.
        r.refusal = lockout_ ? lockout_->refused(listener, user, address, policy) : "";
        bool good = store_->verify(user, password);
        ok = good && r.refusal.empty();
        if (ok) {
            if (cache_.size() > 10000) cache_.clear();
            cache_[k] = now + std::chrono::minutes(5);
            if (lockout_) lockout_->succeeded(listener, user);
        } else if (r.refusal.empty()) {
            // Only a real bad password counts: attempts refused by the lockout itself do not
            // extend it (the user retrying must not lock themselves out for longer).
            r.refusal = store_->find(user) ? "bad password" : "unknown user";
            if (lockout_) lockout_->failed(listener, user, address, policy);
        }
    }
    auto* u = store_->find(user);
    if (ok && u) {
        r.ok = true;
        r.user = user;
        r.groups = u->groups;
    }
    return r;
}

void authenticator::refresh() {
    if (path_.empty()) return;
    auto now = std::chrono::steady_clock::now();
    if (store_ && now - checked_ < std::chrono::seconds(1)) return;
    checked_ = now;
    struct stat st {};
    std::int64_t m = ::stat(path_.c_str(), &st) == 0 ? static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec : 0;
    if (store_ && m == mtime_) return;
    try {
        store_ = std::make_unique<user_store>(user_store::load(path_));
        mtime_ = m;
        cache_.clear();  // a removed user or a new password takes effect at once
    } catch (const std::exception& e) {
        std::cerr << "dmzproxy: user store " << path_ << ": " << e.what() << " (keeping the previous one)\n";
    }
}

namespace {

/// One acceptor per worker per bind address, all on the same port with SO_REUSEPORT: the
/// kernel spreads connections and each stays on the thread that accepted it.
task<> accept_loop(worker& w, std::shared_ptr<const instance_runtime> rt, const listener_runtime& l, tcp::acceptor& acc) {
    while (acc.is_open()) {
        error_code ec;
        tcp::socket s(w.io);
        co_await acc.async_accept(s, redirect(ec));
        if (ec) {
            if (ec == asio::error::operation_aborted || !acc.is_open()) co_return;
            // Out of descriptors and the like: pause briefly rather than spin.
            asio::steady_timer t(w.io, std::chrono::milliseconds(50));
            co_await t.async_wait(redirect(ec));
            continue;
        }
        if (l.cfg->proto == rules::protocol::smtp) start_smtp_session(w, rt, l, std::move(s));
        else start_http_session(w, rt, l, std::move(s));
    }
}

std::string describe_bind_error(const rules::bind_endpoint& b, const error_code& ec) {
    std::string msg = "cannot listen on " + b.to_string() + ": " + ec.message();
    if (ec == asio::error::address_in_use) msg += " (another process holds this address and port; `ss -ltnp` names it)";
    if (ec == asio::error::access_denied) msg += " (ports below 1024 need root or CAP_NET_BIND_SERVICE)";
    if (ec == boost::system::errc::address_not_available) msg += " (no interface has this address)";
    return msg;
}

}  // namespace

int run_instance(std::shared_ptr<const rules::policy> policy, const run_options& opts) {
    auto rt = std::make_shared<instance_runtime>();
    rt->policy = policy;
    rt->name = policy->config().name;
    rt->role = policy->config().role;
    for (auto& l : policy->config().listeners) {
        auto lr = std::make_unique<listener_runtime>();
        lr->cfg = &l;
        // https listeners need a certificate; smtp listeners offer STARTTLS when they have one.
        if (l.proto == rules::protocol::https || (l.proto == rules::protocol::smtp && !l.certificates.empty()))
            lr->tls = std::make_unique<server_tls>(l);
        rt->listeners.push_back(std::move(lr));
    }

    for (auto& l : policy->config().listeners)
        if (l.auth == rules::auth_mode::forms && !rt->sessions) {
            auto key = policy->config().session_key;
            if (key.empty()) {
                auto store = policy->config().user_store;
                auto slash = store.rfind('/');
                key = (slash == std::string::npos ? std::string(".") : store.substr(0, slash)) + "/session.key";
            }
            rt->sessions = session_sealer::open(key);
        }

    unsigned n = opts.threads ? opts.threads : std::max(1u, std::thread::hardware_concurrency());
    access_log log(opts.access_log);
    std::vector<std::unique_ptr<worker>> workers;
    std::vector<std::unique_ptr<tcp::acceptor>> acceptors;
    if (!policy->config().user_store.empty()) proxy::user_store::load(policy->config().user_store);  // malformed: fail now
    auto lockout = std::make_shared<lockout_table>();
    for (unsigned i = 0; i < n; ++i) workers.push_back(std::make_unique<worker>(i, log, policy->config().user_store, lockout));

    for (auto& lr : rt->listeners) {
        for (auto& b : lr->cfg->bind) {
            tcp::endpoint ep(asio::ip::make_address(b.address.to_string()), b.port);
            for (auto& w : workers) {
                auto acc = std::make_unique<tcp::acceptor>(w->io);
                error_code ec;
                acc->open(ep.protocol(), ec);
                if (!ec) acc->set_option(tcp::acceptor::reuse_address(true), ec);
                if (!ec) {
                    int one = 1;
                    if (::setsockopt(acc->native_handle(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0)
                        ec = error_code(errno, boost::system::system_category());
                }
                if (!ec && ep.protocol() == tcp::v6()) acc->set_option(asio::ip::v6_only(true), ec);
                if (!ec) acc->bind(ep, ec);
                if (!ec) acc->listen(asio::socket_base::max_listen_connections, ec);
                if (ec) throw std::runtime_error("listener '" + lr->cfg->name + "': " + describe_bind_error(b, ec));
                asio::co_spawn(w->io, accept_loop(*w, rt, *lr, *acc), asio::detached);
                acceptors.push_back(std::move(acc));
            }
            std::cerr << "dmzproxy: " << rt->name << ": listener " << lr->cfg->name << " (" << rules::to_string(lr->cfg->proto)
                      << ") on " << b.to_string() << "\n";
        }
    }

    // Signals arrive on the first worker. Stopping: no new connections; SMTP sessions say
    // 421 at their next command; after a short grace everything stops. (Draining HTTP
    // requests in flight comes with the operations issue.)
    asio::signal_set signals(workers.front()->io, SIGINT, SIGTERM);
    asio::steady_timer grace(workers.front()->io);
    signals.async_wait([&](const error_code& ec, int sig) {
        if (ec) return;
        std::cerr << "dmzproxy: " << rt->name << ": " << (sig == SIGINT ? "SIGINT" : "SIGTERM") << ", stopping\n";
        for (auto& w : workers)
            asio::post(w->io, [&w = *w, &acceptors] {
                w.stopping = true;
                for (auto& acc : acceptors)
                    if (&acc->get_executor().context() == &w.io) {
                        error_code ignored;
                        acc->close(ignored);
                    }
                auto hooks = w.shutdown_hooks;  // hooks erase themselves as sessions end
                for (auto& [id, hook] : hooks) hook();
            });
        // Stop as soon as every SMTP session has said 421 and gone, at most after 2 s.
        auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
        asio::co_spawn(workers.front()->io, [&, until]() -> task<> {
            while (smtp_sessions().load() > 0 && std::chrono::steady_clock::now() < until) {
                grace.expires_after(std::chrono::milliseconds(20));
                error_code ignored;
                co_await grace.async_wait(redirect(ignored));
            }
            for (auto& w : workers) w->io.stop();
        }, asio::detached);
    });
    std::signal(SIGPIPE, SIG_IGN);
    std::cerr << "dmzproxy: " << rt->name << ": ready, " << n << " worker thread" << (n == 1 ? "" : "s") << "\n";

    std::vector<std::thread> threads;
    for (unsigned i = 1; i < n; ++i) threads.emplace_back([&w = *workers[i]] { w.io.run(); });
    workers.front()->io.run();
    for (auto& w : workers) w->io.stop();
    for (auto& t : threads) t.join();
    log.flush();
    return 0;
}

}  // namespace dmz::proxy
