// What every worker shares: connection ids, the session counters, and the root every
// coroutine's exceptions reach.
#include <iostream>

#include "runtime.hpp"
#include "dmz/proxy/users.hpp"

namespace dmz::proxy {

std::uint64_t next_connection_id() {
    static std::atomic<std::uint64_t> next{1};
    return next.fetch_add(1, std::memory_order_relaxed);
}

std::atomic<int>& http_sessions() {
    static std::atomic<int> n{0};
    return n;
}

std::atomic<int>& smtp_sessions() {
    static std::atomic<int> n{0};
    return n;
}

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

void report_escaped(worker& w, const char* what, std::exception_ptr e) noexcept {
    std::string why = "unknown exception";
    try {
        std::rethrow_exception(e);
    } catch (const std::exception& ex) {
        why = ex.what();
    } catch (...) {
    }
    std::string_view name(what);
    w.stats.escaped(name.rfind("http", 0) == 0 ? "http" : name.rfind("smtp", 0) == 0 ? "smtp" : "other");
    try {
        std::cerr << "dmzproxy: worker " << w.index << ": internal fault: an exception escaped the " << what << ": " << why
                  << '\n';
    } catch (...) {
    }
}

}  // namespace dmz::proxy
