#include <algorithm>
#include <csignal>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <mutex>
#include <iostream>
#include <thread>
#include <utility>

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
        lr->id = policy->resolve_listener(l.name);
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

/// Password-check threads: half the cores (1 to 4), so a guessing flood never takes every
/// core from the event loops. scrypt takes ~100 ms of a core and 32 MiB.
unsigned auth_threads() { return std::clamp(std::thread::hardware_concurrency() / 2, 1u, 4u); }
/// How many checks may wait: a longer queue only makes a client wait longer for the same 503.
std::size_t auth_queue() { return 8 * auth_threads(); }

/// One running instance: its workers, the listening sockets, reloads, the admin endpoint,
/// signals and the drain. Lives on the stack of run_instance(); its members are touched on
/// the first worker's thread once the workers run (signals, admin and drain all live there).
class server {
public:
    server(std::shared_ptr<const rules::policy> policy, const run_options& opts);
    ~server() { auth_.pool->shutdown(); }
    server(const server&) = delete;
    server& operator=(const server&) = delete;
    /// Serves until a drain ends or a second signal stops it. Returns the exit code.
    int run();

private:
    using outcome = std::pair<bool, std::string>;
    void bind_listeners();
    void serve(const std::string& key, const acceptor_group& group);
    outcome reload();
    outcome refuse_reload(const std::string& why) const;
    std::map<std::string, acceptor_group> open_added(const rules::policy& next, std::vector<std::string>& names);
    std::vector<std::string> close_removed(const instance_runtime& next);
    std::string reload_message(const rules::policy& next, const std::vector<std::string>& added,
                               const std::vector<std::string>& removed) const;
    std::optional<rules::bind_endpoint> admin_address() const;
    void start_admin_endpoint();
    void listen_for_signals();
    bool on_signal(int sig);
    void drain(int sig);
    task<> wait_until_drained(std::chrono::steady_clock::time_point until);
    void stop_workers();

    std::shared_ptr<const rules::policy> policy_;  ///< the one started with
    const run_options& opts_;
    std::shared_ptr<const instance_runtime> current_;  ///< the latest snapshot (workers get it by a post)
    unsigned threads_;
    access_log log_;
    /// Password checks and user-store reads, off the workers' threads (shut down before the
    /// workers go: its results are posted to them).
    auth_context auth_;
    std::vector<std::unique_ptr<worker>> workers_;
    std::map<std::string, acceptor_group> endpoints_;  ///< "address:port" -> its acceptors
    int version_ = 1;
    std::chrono::system_clock::time_point loaded_ = std::chrono::system_clock::now();
    bool draining_ = false;
    admin_view view_;
    asio::signal_set signals_;
    asio::steady_timer grace_;
};

server::server(std::shared_ptr<const rules::policy> policy, const run_options& opts)
    : policy_(policy),
      opts_(opts),
      current_(make_runtime(policy, nullptr)),
      threads_(opts.threads ? opts.threads : std::max(1u, std::thread::hardware_concurrency())),
      log_(opts.access_log),
      auth_{std::make_shared<user_directory>(policy->config().user_store), std::make_shared<lockout_table>(),
            std::make_shared<check_pool>(auth_threads(), auth_queue())},
      workers_([&] {
          std::vector<std::unique_ptr<worker>> v;
          for (unsigned i = 0; i < threads_; ++i) {
              v.push_back(std::make_unique<worker>(i, log_, auth_));
              v.back()->rt = current_;
          }
          return v;
      }()),
      signals_(workers_.front()->io, SIGINT, SIGTERM, SIGUSR1),
      grace_(workers_.front()->io) {
    signals_.add(SIGHUP);
}

void server::serve(const std::string& key, const acceptor_group& group) {
    for (std::size_t i = 0; i < group.size(); ++i)
        spawn_guarded(*workers_[i], "accept loop", accept_loop(*workers_[i], key, group[i]));
}

void server::bind_listeners() {
    for (auto& l : policy_->config().listeners)
        for (auto& b : l.bind) {
            auto key = b.to_string();
            endpoints_[key] = open_endpoint(workers_, l, b);
            serve(key, endpoints_[key]);
            std::cerr << "dmzproxy: " << current_->name << ": listener " << l.name << " (" << rules::to_string(l.proto) << ") on "
                      << key << "\n";
        }
}

server::outcome server::refuse_reload(const std::string& why) const {
    std::cerr << "dmzproxy: " << current_->name << ": reload refused, still running config version " << version_ << ":\n"
              << why << (why.empty() || why.back() == '\n' ? "" : "\n");
    return {false, why};
}

/// Opens the addresses `next` binds that are not open yet; throws (having closed what it
/// opened) when one cannot be.
std::map<std::string, acceptor_group> server::open_added(const rules::policy& next, std::vector<std::string>& names) {
    std::map<std::string, acceptor_group> added;
    try {
        for (auto& l : next.config().listeners)
            for (auto& b : l.bind) {
                auto key = b.to_string();
                if (endpoints_.count(key) || added.count(key)) continue;
                added[key] = open_endpoint(workers_, l, b);
                names.push_back(l.name + " on " + key);
            }
    } catch (...) {
        for (auto& [key, group] : added) close_endpoint(workers_, std::move(group));
        throw;
    }
    return added;
}

/// Closes the addresses the new snapshot no longer binds; returns them.
std::vector<std::string> server::close_removed(const instance_runtime& next) {
    std::vector<std::string> removed;
    for (auto it = endpoints_.begin(); it != endpoints_.end();) {
        if (next.bound_at(it->first)) {
            ++it;
            continue;
        }
        removed.push_back(it->first);
        close_endpoint(workers_, std::move(it->second));
        it = endpoints_.erase(it);
    }
    return removed;
}

std::string server::reload_message(const rules::policy& next, const std::vector<std::string>& added,
                                   const std::vector<std::string>& removed) const {
    std::string msg = "reloaded " + opts_.source + ", config version " + std::to_string(version_);
    if (!added.empty()) msg += "; listening now: " + join(added);
    if (!removed.empty()) msg += "; closed: " + join(removed);
    auto& was = policy_->config().admin;
    auto& now = next.config().admin;
    if (opts_.admin.empty() && (now.has_value() != was.has_value() || (now && now->to_string() != was->to_string())))
        msg += "; the admin endpoint stays where it was until a restart";
    return msg;
}

// SIGHUP: load and check the config again; on any error keep running the old one and say
// why. On success new connections get the new snapshot, connections already open finish on
// theirs, and only the addresses that appeared or went away are opened or closed: the
// other listeners never stop accepting.
server::outcome server::reload() {
    if (!opts_.reload) return refuse_reload("this instance was started without a config file to read again");
    std::string why;
    std::shared_ptr<const rules::policy> next;
    std::shared_ptr<const instance_runtime> next_rt;
    std::map<std::string, acceptor_group> added;
    std::vector<std::string> added_names;
    try {
        next = opts_.reload(why);
        if (!next) return refuse_reload(why);
        next_rt = make_runtime(next, current_->revoked);
        added = open_added(*next, added_names);
    } catch (const std::exception& e) {
        return refuse_reload(e.what());
    }
    auto old = std::exchange(current_, next_rt);
    // The new snapshot reaches each worker before any accept on an added address (posts to
    // one worker run in order).
    for (auto& w : workers_) asio::post(w->io, [&w = *w, next_rt] { w.rt = next_rt; });
    auto removed_names = close_removed(*next_rt);
    for (auto& [key, group] : added) {
        serve(key, group);
        endpoints_[key] = std::move(group);
    }
    if (next->config().user_store != old->config().user_store) {
        auth_.users->use(next->config().user_store);
        auth_.users->refresh_soon(*auth_.pool);  // else the next check or lookup does
    }
    ++version_;
    loaded_ = std::chrono::system_clock::now();
    auto msg = reload_message(*next, added_names, removed_names);
    std::cerr << "dmzproxy: " << next_rt->name << ": " << msg << "\n";
    return {true, msg};
}

/// --admin overrides [instance] admin; off loopback it needs a token file.
std::optional<rules::bind_endpoint> server::admin_address() const {
    auto& cfg = policy_->config();
    if (opts_.admin.empty()) return cfg.admin;
    auto colon = opts_.admin.rfind(':');
    auto host = opts_.admin.substr(0, colon == std::string::npos ? 0 : colon);
    if (host.size() > 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
    auto a = rules::ip_address::parse(host);
    int port = colon == std::string::npos ? 0 : std::atoi(opts_.admin.c_str() + colon + 1);
    if (!a || port < 1 || port > 65535) throw std::runtime_error("--admin '" + opts_.admin + "' is not ADDRESS:PORT");
    if (!a->is_loopback() && cfg.admin_token_file.empty())
        throw std::runtime_error("--admin " + opts_.admin + " is not on loopback and the config sets no admin_token_file");
    return rules::bind_endpoint{*a, static_cast<std::uint16_t>(port), {}};
}

/// The admin endpoint (/metrics, /status, /reload) on the first worker.
void server::start_admin_endpoint() {
    view_.workers = &workers_;
    view_.current = &current_;
    view_.version = &version_;
    view_.draining = &draining_;
    view_.source = opts_.source;
    view_.started = std::chrono::system_clock::now();
    view_.reload = [this]() -> outcome {
        if (draining_) return {false, "the instance is draining"};
        return reload();
    };
    view_.loaded = &loaded_;
    auto at = admin_address();
    if (!at) return;
    for (auto& w : workers_) w->stats.on = true;  // counted only when an admin endpoint reads them
    log_.keep_recent(2000);                       // the live log view's lines
    view_.log = &log_;
    if (!policy_->config().admin_token_file.empty()) view_.token = read_token(policy_->config().admin_token_file);
    start_admin(*workers_.front(), *at, view_);
    std::cerr << "dmzproxy: " << current_->name << ": admin endpoint on http://" << at->to_string()
              << "/ (metrics, status, reload, live log at /log" << (view_.token.empty() ? "" : "; bearer token required") << ")\n";
}

// Signals arrive on the first worker. SIGTERM/SIGINT drain (below); a second one stops at
// once. SIGUSR1 reopens the access log (after logrotate moved it). SIGHUP reloads.
void server::listen_for_signals() {
    signals_.async_wait([this](const error_code& ec, int sig) {
        if (ec) return;
        if (on_signal(sig)) listen_for_signals();
    });
}

/// Whether to go on listening (not after the second SIGTERM/SIGINT).
bool server::on_signal(int sig) {
    auto& name = current_->name;
    if (sig == SIGHUP) {
        if (draining_) std::cerr << "dmzproxy: " << name << ": SIGHUP while draining: ignored\n";
        else reload();
    } else if (sig == SIGUSR1) {
        std::string why;
        if (log_.reopen(why)) std::cerr << "dmzproxy: " << name << ": SIGUSR1, access log reopened\n";
        else std::cerr << "dmzproxy: " << name << ": SIGUSR1: cannot reopen the access log (" << why
                       << "); still writing to the file already open\n";
    } else if (draining_) {
        std::cerr << "dmzproxy: " << name << ": second signal, stopping now\n";
        stop_workers();
        return false;
    } else {
        drain(sig);
    }
    return true;
}

// The drain: no new connections; idle keep-alive connections close now; a request in
// flight finishes and its answer says Connection: close; SMTP sessions hear 421 at their
// next command. The process ends when the last connection has gone, or when the drain
// timeout passes.
void server::drain(int sig) {
    draining_ = true;
    std::cerr << "dmzproxy: " << current_->name << ": " << (sig == SIGINT ? "SIGINT" : "SIGTERM") << ", draining (up to "
              << opts_.drain_timeout.count() / 1000.0 << " s; " << http_sessions().load() << " HTTP and "
              << smtp_sessions().load() << " SMTP connections open)\n";
    std::vector<std::shared_ptr<tcp::acceptor>> acceptors;
    for (auto& [key, group] : endpoints_) acceptors.insert(acceptors.end(), group.begin(), group.end());
    for (auto& w : workers_)
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
    auto until = std::chrono::steady_clock::now() + opts_.drain_timeout;
    spawn_guarded(*workers_.front(), "drain", [this, until]() -> task<> { co_await wait_until_drained(until); });
}

task<> server::wait_until_drained(std::chrono::steady_clock::time_point until) {
    while ((http_sessions().load() > 0 || smtp_sessions().load() > 0) && std::chrono::steady_clock::now() < until) {
        grace_.expires_after(std::chrono::milliseconds(20));
        error_code ignored;
        co_await grace_.async_wait(redirect(ignored));
    }
    int left = http_sessions().load() + smtp_sessions().load();
    if (left > 0) std::cerr << "dmzproxy: " << current_->name << ": drain timeout, closing " << left << " connections\n";
    else std::cerr << "dmzproxy: " << current_->name << ": drained\n";
    stop_workers();
}

void server::stop_workers() {
    for (auto& w : workers_) w->io.stop();
}

int server::run() {
    bind_listeners();
    start_admin_endpoint();
    listen_for_signals();
    std::signal(SIGPIPE, SIG_IGN);
    std::cerr << "dmzproxy: " << current_->name << ": ready, " << threads_ << " worker thread" << (threads_ == 1 ? "" : "s")
              << "\n";
    std::vector<std::thread> threads;
    for (unsigned i = 1; i < threads_; ++i) threads.emplace_back([&w = *workers_[i]] { w.io.run(); });
    workers_.front()->io.run();
    stop_workers();
    for (auto& t : threads) t.join();
    auth_.pool->shutdown();
    log_.flush();
    return 0;
}

}  // namespace

int run_instance(std::shared_ptr<const rules::policy> policy, const run_options& opts) {
    server s(std::move(policy), opts);
    return s.run();
}

}  // namespace dmz::proxy
