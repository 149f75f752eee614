// What every worker shares: connection ids, the session counters, and the root every
// coroutine's exceptions reach.
#include <iostream>

#include "runtime.hpp"

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
