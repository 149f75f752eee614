#include "upstream.hpp"

#include <sys/socket.h>

namespace dmz::proxy {

namespace {
constexpr std::size_t max_idle_per_key = 256;
}  // namespace

/// An idle connection is usable when the peer has not closed it. A plain connection must
/// also have nothing to read (an idle upstream has nothing to say); TLS may hold session
/// tickets, so only EOF or an error disqualifies it.
bool still_open(upstream_conn& c) {
    char b;
    ssize_t n = ::recv(c.stream.socket().native_handle(), &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) return false;
    if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK;
    return c.stream.is_tls();
}

std::shared_ptr<upstream_conn> upstream_pool::take(const std::string& key, std::chrono::milliseconds idle_timeout) {
    auto it = idle_.find(key);
    if (it == idle_.end()) return nullptr;
    auto& v = it->second;
    auto now = std::chrono::steady_clock::now();
    while (!v.empty()) {
        auto c = std::move(v.back());
        v.pop_back();
        if (now - c->idle_since < idle_timeout && still_open(*c)) return c;
        c->stream.close();
    }
    return nullptr;
}

void upstream_pool::put(std::shared_ptr<upstream_conn> c) {
    auto& v = idle_[c->key];
    if (v.size() >= max_idle_per_key) {
        v.front()->stream.close();
        v.erase(v.begin());
    }
    c->idle_since = std::chrono::steady_clock::now();
    c->in.release();
    v.push_back(std::move(c));
}

std::size_t upstream_pool::idle_count() const {
    std::size_t n = 0;
    for (auto& [k, v] : idle_) n += v.size();
    return n;
}

}  // namespace dmz::proxy
