#include "access_log.hpp"

#include <spdlog/async.h>
#include <spdlog/sinks/base_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <mutex>
#include <stdexcept>
#include <nlohmann/json.hpp>

namespace dmz::proxy {

namespace {
/// A file sink that can be reopened at the same path (SIGUSR1, after logrotate moved the
/// file): records keep flowing to the old file until the new one is open.
class reopenable_file_sink final : public spdlog::sinks::base_sink<std::mutex> {
public:
    explicit reopenable_file_sink(std::string path) : path_(std::move(path)) {
        f_ = std::fopen(path_.c_str(), "a");
        if (!f_) throw std::runtime_error("cannot open the access log " + path_ + ": " + std::strerror(errno));
    }
    ~reopenable_file_sink() override {
        if (f_) std::fclose(f_);
    }
    bool reopen(std::string& why) {
        std::lock_guard lock(mutex_);
        std::FILE* n = std::fopen(path_.c_str(), "a");
        if (!n) {
            why = std::strerror(errno);
            return false;
        }
        std::fflush(f_);
        std::fclose(f_);
        f_ = n;
        return true;
    }

protected:
    void sink_it_(const spdlog::details::log_msg& msg) override {
        spdlog::memory_buf_t buf;
        formatter_->format(msg, buf);
        std::fwrite(buf.data(), 1, buf.size(), f_);
    }
    void flush_() override { std::fflush(f_); }

private:
    std::string path_;
    std::FILE* f_ = nullptr;
};

std::string now_iso() {
    auto now = std::chrono::system_clock::now();
    auto secs = std::chrono::system_clock::to_time_t(now);
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
    std::tm tm{};
    gmtime_r(&secs, &tm);
    char buf[96];
    std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                  tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<int>(ms));
    return buf;
}
}  // namespace

access_log::access_log(const std::string& path) {
    if (path.empty()) return;
    static std::once_flag pool_once;
    std::call_once(pool_once, [] { spdlog::init_thread_pool(8192, 1); });
    std::shared_ptr<spdlog::sinks::sink> sink;
    if (path == "-")
        sink = std::make_shared<spdlog::sinks::stdout_sink_mt>();
    else
        sink = file_ = std::make_shared<reopenable_file_sink>(path);
    logger_ = std::make_shared<spdlog::async_logger>("access", sink, spdlog::thread_pool(),
                                                     spdlog::async_overflow_policy::block);
    logger_->set_pattern("%v");
    logger_->flush_on(spdlog::level::info);
}

access_log::~access_log() { flush(); }

bool access_log::reopen(std::string& why) {
    if (!file_) return true;
    return static_cast<reopenable_file_sink&>(*file_).reopen(why);
}

void access_log::flush() {
    if (logger_) logger_->flush();
}

void access_log::keep_recent(std::size_t n) {
    std::lock_guard lock(recent_m_);
    keep_ = n;
}

std::pair<std::uint64_t, std::vector<std::string>> access_log::recent(std::uint64_t since) const {
    std::lock_guard lock(recent_m_);
    std::vector<std::string> out;
    std::uint64_t first = next_seq_ - recent_.size();  // the sequence number of recent_.front()
    for (std::size_t i = since >= first ? static_cast<std::size_t>(since - first) : 0; i < recent_.size(); ++i)
        out.push_back(recent_[i]);
    return {next_seq_, std::move(out)};
}

void access_log::write(const access_record& r) {
    bool keep = keep_ != 0;  // set once at start, before any worker runs
    if (!logger_ && !keep) return;
    nlohmann::json j = {{"time", now_iso()},
                        {"instance", r.instance},
                        {"conn", r.conn},
                        {"client", r.client},
                        {"original_client", r.original_client},
                        {"user", r.user},
                        {"listener", r.listener},
                        {"method", r.method},
                        {"host", r.host},
                        {"path", r.path},
                        {"rule", r.rule},
                        {"action", r.action},
                        {"target", r.target},
                        {"status", r.status},
                        {"bytes_in", r.bytes_in},
                        {"bytes_out", r.bytes_out},
                        {"duration_ms", r.duration_ms},
                        {"fault", rules::to_string(r.fault.cls)}};
    if (r.fault) {
        j["fault_side"] = rules::to_string(r.fault.side);
        j["retryable"] = r.fault.retryable;
    }
    const auto& detail = r.fault.detail.empty() ? r.note : r.fault.detail;
    if (!detail.empty()) j["detail"] = detail;
    if (r.protocol == "smtp") {
        j["protocol"] = "smtp";
        j["ehlo"] = r.ehlo;
        j["tls"] = r.tls;
        j["mail_from"] = r.mail_from;
        j["rcpt_accepted"] = r.rcpt_accepted;
        auto refused = nlohmann::json::array();
        for (auto& [rcpt, reply] : r.rcpt_refused) refused.push_back({{"rcpt", rcpt}, {"reply", reply}});
        j["rcpt_refused"] = refused;
        j["size"] = r.size;
        j["upstream_reply"] = r.upstream_reply;
        j["queue_id"] = r.queue_id;
        j.erase("method");
        j.erase("host");
        j.erase("path");
    }
    if (!r.upstream_conn.empty()) j["upstream_conn"] = r.upstream_conn;
    // Invalid UTF-8 from a client's request must not throw: replace it.
    auto line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    if (keep) {
        std::lock_guard lock(recent_m_);
        recent_.push_back(line);
        ++next_seq_;
        while (recent_.size() > keep_) recent_.pop_front();
    }
    if (logger_) logger_->info(line);
}

}  // namespace dmz::proxy
