#pragma once
// One JSON line per transaction, written asynchronously (spdlog's thread pool) so the
// request path never waits for the disk.
#include <cstdint>
#include <memory>
#include <string>

namespace spdlog {
class logger;
}

namespace dmz::proxy {

struct access_record {
    std::string instance;
    std::uint64_t conn = 0;
    std::string client;           ///< the peer of the connection
    std::string original_client;  ///< the client the rules judged
    std::string user;
    std::string listener;
    std::string method, host, path;
    std::string rule, action, target;
    int status = 0;
    std::uint64_t bytes_in = 0, bytes_out = 0;
    double duration_ms = 0;
    std::string fault;   ///< fault class, "" when none
    std::string detail;  ///< fault detail
    std::string upstream_conn;  ///< "new", "reused", "pinned"
};

class access_log {
public:
    /// `path`: a file, "-" for standard output, or "" for no log.
    explicit access_log(const std::string& path);
    ~access_log();
    void write(const access_record& r);
    void flush();

private:
    std::shared_ptr<spdlog::logger> logger_;
};

}  // namespace dmz::proxy
