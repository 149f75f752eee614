#pragma once
// Upstream connections and the per-worker keep-alive pool. One pool per worker thread: no
// locks. Pinned (NTLM/Negotiate) connections never enter the pool.
#include <chrono>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "buffer.hpp"
#include "net/asio.hpp"

namespace dmz::proxy {

struct upstream_conn {
    upstream_conn(net::stream s, std::string k) : stream(std::move(s)), key(std::move(k)) {}
    net::stream stream;
    std::string key;
    flat_buffer in;
    std::chrono::steady_clock::time_point idle_since{};
    std::uint64_t requests = 0;
};

/// Whether an idle connection is still open (the peer has not closed it).
bool still_open(upstream_conn& c);

class upstream_pool {
public:
    /// The most recently used idle connection for `key` that is still open, or null.
    std::shared_ptr<upstream_conn> take(const std::string& key, std::chrono::milliseconds idle_timeout);
    void put(std::shared_ptr<upstream_conn> c);
    std::size_t idle_count() const;

private:
    std::unordered_map<std::string, std::vector<std::shared_ptr<upstream_conn>>> idle_;
};

}  // namespace dmz::proxy
