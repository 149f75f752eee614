#pragma once
// One JSON line per transaction, written asynchronously (spdlog's thread pool) so the
// request path never waits for the disk.
#include <cstdint>
#include <deque>
#include <mutex>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "dmz/rules/fault.hpp"

namespace spdlog {
class logger;
namespace sinks {
class sink;
}
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
    rules::fault fault;  ///< what went wrong, when anything did
    std::string note;    ///< what the log says when nothing went wrong ("forms login")
    std::string upstream_conn;  ///< "new", "reused", "pinned"
    // SMTP (protocol == "smtp"): one line per mail transaction
    std::string protocol = "http";
    std::string ehlo;
    bool tls = false;
    std::string mail_from;
    std::vector<std::string> rcpt_accepted;
    std::vector<std::pair<std::string, std::string>> rcpt_refused;  ///< recipient, reply
    std::uint64_t size = 0;
    std::string upstream_reply;
    std::string queue_id;
};

class access_log {
public:
    /// `path`: a file, "-" for standard output, or "" for no log.
    explicit access_log(const std::string& path);
    ~access_log();
    void write(const access_record& r);
    void flush();
    /// Opens the file again at its path (log rotation). False, with the reason, when it
    /// cannot: records then keep going to the file already open.
    bool reopen(std::string& why);
    /// Keeps the last `n` lines in memory for the live log view (the admin endpoint's
    /// /log/events), whether or not there is a log file. Call before the workers start.
    void keep_recent(std::size_t n);
    /// The kept lines numbered `since` and later (numbers start at 0), and the number the
    /// next line will get.
    std::pair<std::uint64_t, std::vector<std::string>> recent(std::uint64_t since) const;

private:
    std::shared_ptr<spdlog::logger> logger_;
    std::shared_ptr<spdlog::sinks::sink> file_;  ///< the file sink, when the log is a file
    mutable std::mutex recent_m_;
    std::deque<std::string> recent_;
    std::uint64_t next_seq_ = 0;
    std::size_t keep_ = 0;
};

}  // namespace dmz::proxy
