#include <csignal>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <mutex>
#include <iostream>
#include <thread>

#include "dmz/proxy/run.hpp"
#include "admin.hpp"
#include "runtime.hpp"

namespace dmz::proxy {

using namespace net;

namespace {

/// One acceptor per worker per bind address, all on the same port with SO_REUSEPORT: the
/// kernel spreads connections and each stays on the thread that accepted it. Each accepted
/// connection gets the current snapshot and the listener that snapshot binds here (a
/// reload may change a listener's protocol, certificates or name on the same address).
task<> accept_loop(worker& w, std::string endpoint, std::shared_ptr<tcp::acceptor> acc) {
    while (acc->is_open()) {
        error_code ec;
        tcp::socket s(w.io);
        co_await acc->async_accept(s, redirect(ec));
        if (ec) {
            if (ec == asio::error::operation_aborted || !acc->is_open()) co_return;
            // Out of descriptors and the like: pause briefly rather than spin.
            asio::steady_timer t(w.io, std::chrono::milliseconds(50));
            co_await t.async_wait(redirect(ec));
            continue;
        }
        auto* l = w.rt->bound_at(endpoint);
        if (!l) continue;  // the listener went away in a reload an instant ago
        if (l->cfg->proto == rules::protocol::smtp) start_smtp_session(w, w.rt, *l, std::move(s));
        else start_http_session(w, w.rt, *l, endpoint, std::move(s));
    }
}

std::string describe_bind_error(const rules::bind_endpoint& b, const error_code& ec) {
    std::string msg = "cannot listen on " + b.to_string() + ": " + ec.message();
    if (ec == asio::error::address_in_use) msg += " (another process holds this address and port; `ss -ltnp` names it)";
    if (ec == asio::error::access_denied) msg += " (ports below 1024 need root or CAP_NET_BIND_SERVICE)";
    if (ec == boost::system::errc::address_not_available) msg += " (no interface has this address)";
    return msg;
}

/// The admin token: the file's first line, without surrounding whitespace.
std::string read_token(const std::string& path) {
    std::ifstream f(path);
    std::string t;
    if (!f || !std::getline(f, t)) throw std::runtime_error("admin_token_file " + path + ": cannot read it");
    auto b = t.find_first_not_of(" \t\r");
    auto e = t.find_last_not_of(" \t\r");
    t = b == std::string::npos ? std::string() : t.substr(b, e - b + 1);
    if (t.size() < 16) throw std::runtime_error("admin_token_file " + path + ": the token must be at least 16 characters");
    return t;
}

std::string join(const std::vector<std::string>& v) {
    std::string out;
    for (auto& x : v) out += (out.empty() ? "" : ", ") + x;
    return out;
}

/// Builds the snapshot of a policy: the listeners' TLS contexts and the forms-session key.
/// Throws (naming the listener and the file) when a certificate or key cannot be used.
std::shared_ptr<const instance_runtime> make_runtime(std::shared_ptr<const rules::policy> policy,
                                                     std::shared_ptr<revoked_sessions> revoked) {
    auto rt = std::make_shared<instance_runtime>();
    rt->policy = policy;
    rt->name = policy->config().name;
    rt->role = policy->config().role;
    if (revoked) rt->revoked = std::move(revoked);  // a logout stays a logout across reloads
    for (auto& l : policy->config().listeners) {
        auto lr = std::make_unique<listener_runtime>();
        lr->cfg = &l;
        // https listeners need a certificate; smtp listeners offer STARTTLS when they have one.
        if (l.proto == rules::protocol::https || (l.proto == rules::protocol::smtp && !l.certificates.empty()))
            lr->tls = std::make_unique<server_tls>(l);
        for (auto& b : l.bind) rt->by_endpoint[b.to_string()] = lr.get();
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
    if (!policy->config().user_store.empty()) proxy::user_store::load(policy->config().user_store);  // malformed: fail now
    return rt;
}

/// The listening sockets of one bind address, one per worker.
using acceptor_group = std::vector<std::shared_ptr<tcp::acceptor>>;

/// Opens a bind address on every worker, or throws naming the listener and the address.
acceptor_group open_endpoint(std::vector<std::unique_ptr<worker>>& workers, const rules::listener& l,
                             const rules::bind_endpoint& b) {
    acceptor_group group;
    tcp::endpoint ep(asio::ip::make_address(b.address.to_string()), b.port);
    for (auto& w : workers) {
        auto acc = std::make_shared<tcp::acceptor>(w->io);
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
        if (ec) throw std::runtime_error("listener '" + l.name + "': " + describe_bind_error(b, ec));
        group.push_back(std::move(acc));
    }
    return group;
}

/// Closes a group's sockets, each on its own worker (Asio objects belong to their thread).
void close_endpoint(std::vector<std::unique_ptr<worker>>& workers, acceptor_group group) {
    for (std::size_t i = 0; i < group.size(); ++i)
        asio::post(workers[i]->io, [acc = std::move(group[i])] {
            error_code ignored;
            acc->close(ignored);
        });
}

}  // namespace

int run_instance(std::shared_ptr<const rules::policy> policy, const run_options& opts) {
    auto rt = make_runtime(policy, nullptr);
    auto current = rt;  // the latest snapshot (the workers get it by a post)

    unsigned n = opts.threads ? opts.threads : std::max(1u, std::thread::hardware_concurrency());
    access_log log(opts.access_log);
    std::vector<std::unique_ptr<worker>> workers;
    auto lockout = std::make_shared<lockout_table>();
    for (unsigned i = 0; i < n; ++i) {
        workers.push_back(std::make_unique<worker>(i, log, policy->config().user_store, lockout));
        workers.back()->rt = rt;
    }

    std::map<std::string, acceptor_group> endpoints;  // "address:port" -> its acceptors
    auto serve = [&](const std::string& key, const acceptor_group& group) {
        for (std::size_t i = 0; i < group.size(); ++i)
            spawn_guarded(*workers[i], "accept loop", accept_loop(*workers[i], key, group[i]));
    };
    for (auto& l : policy->config().listeners)
        for (auto& b : l.bind) {
            auto key = b.to_string();
            endpoints[key] = open_endpoint(workers, l, b);
            serve(key, endpoints[key]);
            std::cerr << "dmzproxy: " << rt->name << ": listener " << l.name << " (" << rules::to_string(l.proto) << ") on " << key
                      << "\n";
        }

    // SIGHUP: load and check the config again; on any error keep running the old one and
    // say why. On success new connections get the new snapshot, connections already open
    // finish on theirs, and only the addresses that appeared or went away are opened or
    // closed: the other listeners never stop accepting.
    int version = 1;
    auto loaded = std::chrono::system_clock::now();
    auto reload = [&]() -> std::pair<bool, std::string> {
        auto old = current;
        auto fail = [&](const std::string& why) -> std::pair<bool, std::string> {
            std::cerr << "dmzproxy: " << old->name << ": reload refused, still running config version " << version << ":\n"
                      << why << (why.empty() || why.back() == '\n' ? "" : "\n");
            return {false, why};
        };
        if (!opts.reload) return fail("this instance was started without a config file to read again");
        std::string why;
        std::shared_ptr<const rules::policy> next;
        std::shared_ptr<const instance_runtime> next_rt;
        try {
            next = opts.reload(why);
            if (!next) return fail(why);
            next_rt = make_runtime(next, old->revoked);
        } catch (const std::exception& e) {
            return fail(e.what());
        }
        std::map<std::string, acceptor_group> added;
        std::vector<std::string> added_names, removed_names;
        try {
            for (auto& l : next->config().listeners)
                for (auto& b : l.bind) {
                    auto key = b.to_string();
                    if (endpoints.count(key) || added.count(key)) continue;
                    added[key] = open_endpoint(workers, l, b);
                    added_names.push_back(l.name + " on " + key);
                }
        } catch (const std::exception& e) {
            for (auto& [key, group] : added) close_endpoint(workers, std::move(group));
            return fail(e.what());
        }
        // The new snapshot reaches each worker before any accept on an added address
        // (posts to one worker run in order).
        current = next_rt;
        for (auto& w : workers) asio::post(w->io, [&w = *w, next_rt] { w.rt = next_rt; });
        for (auto it = endpoints.begin(); it != endpoints.end();) {
            if (next_rt->bound_at(it->first)) {
                ++it;
                continue;
            }
            removed_names.push_back(it->first);
            close_endpoint(workers, std::move(it->second));
            it = endpoints.erase(it);
        }
        for (auto& [key, group] : added) {
            serve(key, group);
            endpoints[key] = std::move(group);
        }
        if (next->config().user_store != old->config().user_store)
            for (auto& w : workers)
                asio::post(w->io, [&w = *w, path = next->config().user_store] { w.auth.use(path); });
        ++version;
        loaded = std::chrono::system_clock::now();
        std::string msg = "reloaded " + opts.source + ", config version " + std::to_string(version);
        if (!added_names.empty()) msg += "; listening now: " + join(added_names);
        if (!removed_names.empty()) msg += "; closed: " + join(removed_names);
        if (opts.admin.empty() && (next->config().admin.has_value() != policy->config().admin.has_value() ||
                                   (next->config().admin && next->config().admin->to_string() != policy->config().admin->to_string())))
            msg += "; the admin endpoint stays where it was until a restart";
        std::cerr << "dmzproxy: " << next_rt->name << ": " << msg << "\n";
        return {true, msg};
    };
    // The acceptors, for the drain (which closes them all).
    auto all_acceptors = [&] {
        std::vector<std::shared_ptr<tcp::acceptor>> v;
        for (auto& [key, group] : endpoints) v.insert(v.end(), group.begin(), group.end());
        return v;
    };

    bool draining = false;
    // The admin endpoint (/metrics, /status, /reload) on the first worker.
    admin_view view;
    view.workers = &workers;
    view.current = &current;
    view.version = &version;
    view.draining = &draining;
    view.source = opts.source;
    view.started = std::chrono::system_clock::now();
    view.reload = [&]() -> std::pair<bool, std::string> {
        if (draining) return {false, "the instance is draining"};
        return reload();
    };
    view.loaded = &loaded;
    std::optional<rules::bind_endpoint> admin_at = policy->config().admin;
    if (!opts.admin.empty()) {
        auto colon = opts.admin.rfind(':');
        auto host = opts.admin.substr(0, colon == std::string::npos ? 0 : colon);
        if (host.size() > 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
        auto a = rules::ip_address::parse(host);
        int port = colon == std::string::npos ? 0 : std::atoi(opts.admin.c_str() + colon + 1);
        if (!a || port < 1 || port > 65535) throw std::runtime_error("--admin '" + opts.admin + "' is not ADDRESS:PORT");
        if (!a->is_loopback() && policy->config().admin_token_file.empty())
            throw std::runtime_error("--admin " + opts.admin + " is not on loopback and the config sets no admin_token_file");
        admin_at = rules::bind_endpoint{*a, static_cast<std::uint16_t>(port), {}};
    }
    if (admin_at) {
        for (auto& w : workers) w->stats.on = true;  // counted only when an admin endpoint reads them
        log.keep_recent(2000);  // the live log view's lines
        view.log = &log;
        if (!policy->config().admin_token_file.empty()) view.token = read_token(policy->config().admin_token_file);
        start_admin(*workers.front(), *admin_at, view);
        std::cerr << "dmzproxy: " << current->name << ": admin endpoint on http://" << admin_at->to_string()
                  << "/ (metrics, status, reload, live log at /log" << (view.token.empty() ? "" : "; bearer token required") << ")\n";
    }
    // Signals arrive on the first worker.
    // SIGTERM/SIGINT drain: no new connections; idle keep-alive connections close now; a
    // request in flight finishes and its answer says Connection: close; SMTP sessions hear
    // 421 at their next command. The process ends when the last connection has gone, or
    // when the drain timeout passes. A second SIGTERM/SIGINT stops at once.
    // SIGUSR1 reopens the access log (after logrotate moved it). SIGHUP reloads (above).
    asio::signal_set signals(workers.front()->io, SIGINT, SIGTERM, SIGUSR1);
    signals.add(SIGHUP);
    asio::steady_timer grace(workers.front()->io);
    std::function<void()> listen;
    auto drain = [&](int sig) {
        draining = true;
        std::cerr << "dmzproxy: " << current->name << ": " << (sig == SIGINT ? "SIGINT" : "SIGTERM") << ", draining (up to "
                  << opts.drain_timeout.count() / 1000.0 << " s; " << http_sessions().load() << " HTTP and "
                  << smtp_sessions().load() << " SMTP connections open)\n";
        auto acceptors = all_acceptors();
        for (auto& w : workers)
            asio::post(w->io, [&w = *w, acceptors] {
                w.stopping = true;
                for (auto& acc : acceptors)
                    if (&acc->get_executor().context() == &w.io) {
                        error_code ignored;
                        acc->close(ignored);
                    }
                auto hooks = w.shutdown_hooks;  // hooks erase themselves as sessions end
                for (auto& [id, hook] : hooks) hook();
                w.parked.close_all();  // idle keep-alive connections close now, parked ones too
            });
        auto until = std::chrono::steady_clock::now() + opts.drain_timeout;
        spawn_guarded(*workers.front(), "drain", [&, until]() -> task<> {
            while ((http_sessions().load() > 0 || smtp_sessions().load() > 0) && std::chrono::steady_clock::now() < until) {
                grace.expires_after(std::chrono::milliseconds(20));
                error_code ignored;
                co_await grace.async_wait(redirect(ignored));
            }
            int left = http_sessions().load() + smtp_sessions().load();
            if (left > 0) std::cerr << "dmzproxy: " << current->name << ": drain timeout, closing " << left << " connections\n";
            else std::cerr << "dmzproxy: " << current->name << ": drained\n";
            for (auto& w : workers) w->io.stop();
        });
    };
    listen = [&] {
        signals.async_wait([&](const error_code& ec, int sig) {
            if (ec) return;
            if (sig == SIGHUP) {
                if (draining) std::cerr << "dmzproxy: " << current->name << ": SIGHUP while draining: ignored\n";
                else reload();
            } else if (sig == SIGUSR1) {
                std::string why;
                if (log.reopen(why)) std::cerr << "dmzproxy: " << current->name << ": SIGUSR1, access log reopened\n";
                else std::cerr << "dmzproxy: " << current->name << ": SIGUSR1: cannot reopen the access log (" << why
                               << "); still writing to the file already open\n";
            } else if (draining) {
                std::cerr << "dmzproxy: " << current->name << ": second signal, stopping now\n";
                for (auto& w : workers) w->io.stop();
                return;
            } else {
                drain(sig);
            }
            listen();
        });
    };
    listen();
    std::signal(SIGPIPE, SIG_IGN);
    std::cerr << "dmzproxy: " << current->name << ": ready, " << n << " worker thread" << (n == 1 ? "" : "s") << "\n";

    std::vector<std::thread> threads;
    for (unsigned i = 1; i < n; ++i) threads.emplace_back([&w = *workers[i]] { w.io.run(); });
    workers.front()->io.run();
    for (auto& w : workers) w->io.stop();
    for (auto& t : threads) t.join();
    log.flush();
    return 0;
}

}  // namespace dmz::proxy
